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
    local_world_size: int = 0  # processes on this node (torchrun's LOCAL_WORLD_SIZE); 0: all
    # a gloo group whose collectives wait up to WAIT_FOR_MAIN_S: see main_first and teardown
    wait_group: Any = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def per_node(self) -> int:
        return self.local_world_size or self.world_size

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
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
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
    return Dist(rank, world, local_rank, device, per_node, wait_group)


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


def teardown(d: Dist | None = None, finished: bool = False) -> None:
    """Leave the process group in order.

    After a finished run (`finished`), every rank first waits until all of them got here, so
    none destroys the group (and exits) while rank 0 still writes final/ and the loss plot:
    on the gloo group that waits up to WAIT_FOR_MAIN_S, since writing a large model can take
    longer than launch.timeout_s, and a wait on the CPU holds no GPU collective open. After a
    failure there is no wait: the other ranks may never arrive.
    """
    if not tdist.is_initialized():
        return
    if finished and d is not None and d.wait_group is not None:
        tdist.barrier(group=d.wait_group)
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


CHECKSUM_CHUNK = 1 << 24  # elements of a weight upcast to float64 at a time (128 MiB)


def params_checksum(model: torch.nn.Module, trainable_only: bool = True) -> str:
    """A cheap checksum of this rank's own trainable weights (every weight with
    `trainable_only=False`): per tensor, its float64 sum and
    sum of squares, computed where the tensor lives, CHECKSUM_CHUNK elements at a time (never a
    float64 copy of a whole weight), then one small transfer to the CPU.

    The weights must be whole on this rank: with FSDP call it before sharding (a shard is a
    different slice on every rank, and gathering the shards would show every rank the same
    values, hiding a rank that built different weights).
    """
    stats = []
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            if hasattr(p, "to_local"):
                raise ValueError("params_checksum needs whole weights; this one is an FSDP shard")
            total = torch.zeros(2, dtype=torch.float64, device=p.device)
            for chunk in p.detach().reshape(-1).split(CHECKSUM_CHUNK):
                chunk = chunk.double()
                total += torch.stack([chunk.sum(), chunk.square().sum()])
            stats.append(total)
    if not stats:
        return "no trainable parameters"
    flat = torch.stack(stats).cpu().numpy().tobytes()
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
