"""Process group up/down, rank info, the agreed seed and its derived streams."""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

WAIT_FOR_MAIN_S = 24 * 3600.0  # how long ranks wait for rank 0's own work (not a hang)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # a gloo group whose collectives wait up to WAIT_FOR_MAIN_S: see main_first
    wait_group: Any = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(local_rank: int = 0) -> torch.device:
    """The CUDA device of this local rank when there is one, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup(timeout_s: float = 300.0) -> Dist:
    """Join the process group when started by torchrun; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    wait_group = None
    if world > 1:  # made once, by every rank, while they are all here
        wait_group = tdist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=WAIT_FOR_MAIN_S)
        )
    return Dist(rank, world, local_rank, device, wait_group)


@contextmanager
def main_first(d: Dist, what: str = "") -> Iterator[None]:
    """Rank 0 does its own long work in the body (tokenising the data, writing a checkpoint);
    every rank then meets at a barrier that waits up to WAIT_FOR_MAIN_S, not launch.timeout_s:
    that timeout is for collectives all ranks reach together, where a wait means a hang.

    `what`: said in rank 0's log as the body starts (why the other ranks are idle). If the
    body raises, no rank waits for the others; a rank that dies ends the wait of the others at
    once (its gloo connections close).
    """
    if what and d.distributed and d.is_main:
        from lockstep.report import log as logmod

        logmod.get().info(f"the other {d.world_size - 1} rank(s) wait while rank 0 {what}")
    yield
    if d.distributed:
        tdist.barrier(group=d.wait_group)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def agree_seed(seed: int | None, d: Dist) -> int:
    """The configured seed, or one drawn by rank 0 from OS entropy and broadcast to all ranks."""
    value = seed if seed is not None else secrets.randbits(62)
    if d.distributed:
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device(d))
        tdist.broadcast(t, src=0)
        value = int(t.item())
    return value


def derive_seed(seed: int, stream: str, *extra: int) -> int:
    """Independent streams from one seed: 'init' (same on all ranks), 'rank' (seed + rank), ..."""
    digest = hashlib.sha256(f"{seed}|{stream}|{'|'.join(map(str, extra))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(d))
    tdist.all_reduce(t)
    return t.tolist()


def _comm_device(d: Dist) -> torch.device:
    return d.device if d.device.type == "cuda" else torch.device("cpu")


# ---------------------------------------------------------------- lockstep fingerprint check


def params_checksum(model: torch.nn.Module) -> str:
    """A cheap checksum of the trainable parameters (per-tensor float64 sum and sum of squares)."""
    stats = []
    for p in model.parameters():
        if p.requires_grad:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard: gather it
            stats.append(torch.stack([t.double().sum(), t.double().square().sum()]))
    if not stats:
        return "no trainable parameters"
    flat = torch.cat(stats).cpu().numpy().tobytes()
    return hashlib.sha256(flat).hexdigest()[:16]


def check_lockstep(fields: dict[str, str], d: Dist, when: str) -> None:
    """All ranks compare their fingerprints; any difference stops every rank with one table."""
    from lockstep.errors import TrainingError

    if not d.distributed:
        return
    gathered: list[dict[str, str] | None] = [None] * d.world_size
    tdist.all_gather_object(gathered, fields)
    rows = []
    for rank, other in enumerate(gathered):
        for key in fields:
            ref, value = str(gathered[0].get(key)), str(other.get(key))
            if value != ref:
                rows.append((key, ref, f"rank {rank}: {value}"))
    if rows:
        width = max(len(r[0]) for r in rows + [("field", "", "")])
        ref_w = max(len(r[1]) for r in rows + [("", "rank 0", "")])
        lines = [f"  {'field':<{width}} | {'rank 0':<{ref_w}} | differing rank"]
        lines += [f"  {k:<{width}} | {a:<{ref_w}} | {b}" for k, a, b in rows]
        raise TrainingError(
            f"ranks are out of lockstep ({when}); every rank must agree on:\n" + "\n".join(lines)
        )
