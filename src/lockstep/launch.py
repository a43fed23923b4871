"""The world plan: how many processes where, in-process or torchrun; the parallel-mode guard.

Precedence for every launch value: command-line flag > environment variable > config file.
The environment variables are the ones other fine-tuning tools use: NPROC_PER_NODE, NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lockstep.config import LaunchConfig
from lockstep.errors import LaunchError

ENV_VARS = {
    "nproc_per_node": "NPROC_PER_NODE",
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class WorldPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None
    max_restarts: int

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def in_process(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        if self.in_process:
            return "world: 1 process, in this process"
        nodes = f" x {self.nnodes} nodes (this is node {self.node_rank})" if self.nnodes > 1 else ""
        return (
            f"world: {self.world_size} processes = {self.nproc_per_node} per node{nodes}; "
            f"rendezvous {self.master_addr}:{self.master_port or 'a free port'}"
        )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(
    cfg: LaunchConfig,
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    gpus: int,
) -> WorldPlan:
    """Merge flag > env > config into a WorldPlan; `gpus` decides nproc_per_node=auto."""
    values: dict[str, object] = {}
    for key in ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port"):
        if flags.get(key) is not None:
            values[key] = flags[key]
        elif env.get(ENV_VARS[key], "") != "":
            values[key] = env[ENV_VARS[key]]
        else:
            values[key] = getattr(cfg, key)

    def integer(key: str, low: int, high: int | None = None) -> int:
        raw = values[key]
        try:
            value = int(str(raw))
        except ValueError:
            raise LaunchError(
                f"{key} must be an integer, got {raw!r} ({_source(key, flags, env)})"
            ) from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise LaunchError(f"{key} must be {bound}, got {value} ({_source(key, flags, env)})")
        return value

    if str(values["nproc_per_node"]) == "auto":
        nproc = max(gpus, 1)
    else:
        nproc = integer("nproc_per_node", 1)
    nnodes = integer("nnodes", 1)
    node_rank = integer("node_rank", 0, nnodes - 1)
    port = None if values["master_port"] is None else integer("master_port", 1, 65535)
    if nnodes > 1 and port is None:
        raise LaunchError(
            f"{nnodes} nodes need an agreed rendezvous port: a port picked at random on each "
            "node cannot meet. Set --master-port PORT (or MASTER_PORT, or launch.master_port) "
            "to the same free port on every node."
        )
    return WorldPlan(nproc, nnodes, node_rank, str(values["master_addr"]), port, cfg.max_restarts)


def _source(key: str, flags: Mapping[str, object | None], env: Mapping[str, str]) -> str:
    if flags.get(key) is not None:
        return f"from --{key.replace('_', '-')}"
    if env.get(ENV_VARS[key]):
        return f"from the environment variable {ENV_VARS[key]}"
    return f"from launch.{key}"


def torchrun_argv(p: WorldPlan, train_args: list[str]) -> list[str]:
    """The torchrun command as an argument list: nothing is ever joined and re-split."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(p.nproc_per_node),
    ]
    if p.nnodes == 1 and p.master_port is None:
        argv += ["--standalone"]
    else:
        argv += [
            "--nnodes", str(p.nnodes), "--node-rank", str(p.node_rank),
            "--master-addr", p.master_addr, "--master-port", str(p.master_port),
        ]  # fmt: skip
    argv += ["--max-restarts", str(p.max_restarts), "-m", "lockstep.train", *train_args]
    return argv


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)


# ---------------------------------------------------------------- the parallel-mode guard

Launcher = Literal["lockstep", "torchrun", "direct"]


def launcher(env: Mapping[str, str], via_lockstep: bool) -> Launcher:
    if all(k in env for k in TORCHRUN_ENV):
        return "torchrun"
    return "lockstep" if via_lockstep else "direct"


def guard(how: Launcher, gpus: int, debug: bool) -> str | None:
    """None if this process may train; else the refusal, in words.

    A process started directly (python -m lockstep.train, an IDE) that sees several GPUs would
    use one of them while its user believes all are used. `lockstep train` and torchrun plan the
    world deliberately, and debug mode means one process on purpose.
    """
    if how != "direct" or debug or gpus <= 1:
        return None
    return (
        f"this process sees {gpus} GPUs but was started directly, so it would train on one of "
        "them only. Choose one of:\n"
        f"  lockstep train cfg.yaml                                  (all {gpus} GPUs)\n"
        f"  torchrun --nproc-per-node {gpus} -m lockstep.train cfg.yaml  (the same, by hand)\n"
        "  --debug or LOCKSTEP_DEBUG=1                              (one process, on purpose)\n"
        "  CUDA_VISIBLE_DEVICES=0                                   (show this process one GPU)"
    )


def debug_requested(flag: bool, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return flag or env.get("LOCKSTEP_DEBUG", "") not in ("", "0")
