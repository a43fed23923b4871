"""The world plan: how many processes where, in-process or torchrun; the parallel-mode guard.

Precedence for every launch value: command-line flag > environment variable > a launch.* value
the config file sets > SLURM's allocation (under srun/sbatch) > launch.*'s default.
The environment variables are the ones other fine-tuning tools use: NPROC_PER_NODE, NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT. Under SLURM the world comes from SLURM_NNODES,
SLURM_NODEID, the first host of SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE (or
SLURM_NTASKS_PER_NODE) and a port derived from SLURM_JOB_ID (slurm_values).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

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
FAILURE_DIR_ENV = "LOCKSTEP_FAILURE_DIR"  # set by `lockstep train` for the processes it starts
LAUNCHER_RECORD = "launcher.json"  # torchrun's record of how its workers ended (lockstep.torchrun)
PR_SET_PDEATHSIG = 1  # prctl(2) option: a signal this process gets when its parent dies
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # the rendezvous port every node derives
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")


@dataclass(frozen=True)
class WorldPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None
    max_restarts: int
    sources: tuple[tuple[str, str], ...] = ()  # (key, where its value came from), LAUNCH_KEYS

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
        ) + self.origins()

    def origins(self) -> str:
        """Where each value that did not come from launch.*'s defaults came from, in words:
        "; from nnodes=4 (SLURM_NNODES), master_port=29500 (--master-port)"."""
        shown = [
            f"{key}={getattr(self, key)} ({source})"
            for key, source in self.sources
            if source != "default"
        ]
        return f"; from {', '.join(shown)}" if shown else ""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(
    cfg: LaunchConfig,
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    gpus: int,
) -> WorldPlan:
    """Merge flag > env > config > SLURM > defaults into a WorldPlan; `gpus` decides
    nproc_per_node=auto."""
    slurm = slurm_values(env)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key in LAUNCH_KEYS:
        if flags.get(key) is not None:
            values[key], sources[key] = flags[key], f"--{key.replace('_', '-')}"
        elif env.get(ENV_VARS[key], "") != "":
            values[key], sources[key] = env[ENV_VARS[key]], ENV_VARS[key]
        elif key in cfg.model_fields_set:
            values[key], sources[key] = getattr(cfg, key), f"launch.{key}"
        elif key in slurm:
            values[key], sources[key] = slurm[key]
        else:
            values[key], sources[key] = getattr(cfg, key), "default"

    def integer(key: str, low: int, high: int | None = None) -> int:
        raw = values[key]
        try:
            value = int(str(raw))
        except ValueError:
            raise LaunchError(
                f"{key} must be an integer, got {raw!r} (from {sources[key]})"
            ) from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise LaunchError(f"{key} must be {bound}, got {value} (from {sources[key]})")
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
    return WorldPlan(
        nproc, nnodes, node_rank, str(values["master_addr"]), port, cfg.max_restarts,
        tuple((key, sources[key]) for key in LAUNCH_KEYS),
    )  # fmt: skip


def slurm_values(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The launch values SLURM's environment gives, {key: (value, the variable it came from)};
    empty outside a SLURM job (no SLURM_JOB_ID).

    One `lockstep train` task per node (srun --ntasks-per-node=1) starts that node's processes
    itself: nproc_per_node is SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE (a CPU
    allocation); nnodes SLURM_NNODES; node_rank SLURM_NODEID; master_addr the first host of
    SLURM_JOB_NODELIST; master_port SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN, which
    every node of the job computes alike.
    """
    if not env.get("SLURM_JOB_ID", "").strip():
        return {}
    if env.get("SLURM_LOCALID", "0").strip() not in ("", "0"):
        raise LaunchError(
            f"SLURM started several `lockstep train` tasks on node {env.get('SLURMD_NODENAME', '')}"
            f" (this is task {env['SLURM_LOCALID']}): lockstep starts a node's processes itself, "
            "so run one task per node: srun --ntasks-per-node=1 lockstep train cfg.yaml"
        )
    found: dict[str, tuple[str, str]] = {}
    for key, names in (
        ("nproc_per_node", ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE")),
        ("nnodes", ("SLURM_NNODES",)),
        ("node_rank", ("SLURM_NODEID",)),
    ):
        for name in names:
            value = env.get(name, "").strip()
            if value and not (key == "nproc_per_node" and value == "0"):
                found[key] = (value, name)
                break
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")).strip()
    if nodelist:
        found["master_addr"] = (first_host(nodelist), "SLURM_JOB_NODELIST")
    job = env["SLURM_JOB_ID"].strip()
    if job.isdigit():
        port = SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN
        found["master_port"] = (str(port), "SLURM_JOB_ID")
    return found


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (the rendezvous host): see expand_hosts."""
    return next(expand_hosts(nodelist))


def expand_hosts(nodelist: str) -> Iterator[str]:
    """The hosts of a SLURM host list, in its order: `gpu[01-03,07],login1` -> gpu01, gpu02,
    gpu03, gpu07, login1; `rack[1-2]-n[5,9]` -> rack1-n5, rack1-n9, rack2-n5, rack2-n9.
    A range keeps its start's zero padding. A malformed list is a LaunchError naming it."""
    for entry in re.split(r",(?![^\[]*\])", nodelist.strip()):
        match = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", entry)
        if not match:
            if not entry or "[" in entry or "]" in entry:
                raise LaunchError(f"SLURM_JOB_NODELIST: cannot read the host list {nodelist!r}")
            yield entry
            continue
        prefix, ranges, rest = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or not (high or low).isdigit():
                raise LaunchError(f"SLURM_JOB_NODELIST: cannot read the host list {nodelist!r}")
            for n in range(int(low), int(high or low) + 1):
                yield from expand_hosts(f"{prefix}{n:0{len(low)}d}{rest}")


def torchrun_argv(
    p: WorldPlan, train_args: list[str], launcher_module: str = "torch.distributed.run"
) -> list[str]:
    """The torchrun command as an argument list: nothing is ever joined and re-split.

    `launcher_module`: `lockstep train` starts torchrun through lockstep.torchrun (the same
    launcher, which dies with its parent and records how workers ended); --dry-run shows the
    plain torchrun command a user can run by hand.
    """
    argv = [sys.executable, "-m", launcher_module, "--nproc-per-node", str(p.nproc_per_node)]
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


# ---------------------------------------------------------------- processes that die together


def die_with_parent(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere a
    no-op returning False). torchrun starts workers in sessions of their own, so a signal to
    the launcher's process group (a closed terminal, a scheduler's kill) never reaches them:
    without this, workers of a killed launcher train on with nobody attached."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


# ---------------------------------------------------------------- which rank failed, and how

LAUNCHER_SLACK_S = 5.0  # torchrun notices a dead worker within its polling interval (0.1 s)
SIGNAL_HINTS = {
    "SIGKILL": " (out of memory? the kernel's OOM killer sends SIGKILL; see `dmesg`)",
    "SIGSEGV": " (a crash in native code)",
    "SIGABRT": " (aborted by native code)",
    "SIGBUS": " (a memory access error: full /dev/shm?)",
}


def first_failure(records: list[dict], launcher: dict[str, dict], ranks: list[int]) -> str | None:
    """The one line that says which rank failed first and how, or None if nothing is known.

    `records`: what failing ranks wrote themselves (train.py: rank, time, error, and `comm`
    for an error of the communication between ranks); `launcher`: torchrun's record of how its
    workers ended ({rank: exitcode, signal, time}), those it stopped itself included; `ranks`:
    the ranks this node ran.

    A rank killed by a signal writes nothing. If it died before the first written error (within
    the launcher's polling slack), it is the cause and the others' errors (a peer gone) are
    consequences. A rank that wrote nothing and ended only when the launcher stopped it, long
    after the others failed talking to it, had stopped responding.
    """
    wrote = {r["rank"] for r in records}
    first_written = min((r["time"] for r in records), default=float("inf"))
    ended = {int(rank): v for rank, v in launcher.items() if int(rank) not in wrote}
    killed = sorted(
        (v["time"], rank, v["signal"])
        for rank, v in ended.items()
        if v.get("signal") and v["time"] <= first_written + LAUNCHER_SLACK_S
    )
    if killed:
        _, rank, name = killed[0]
        return f"rank {rank} was killed by {name}{SIGNAL_HINTS.get(name, '')}"
    failed = sorted((r for r in records if "preempted" not in r), key=lambda r: r["time"])
    silent = [r for r in ranks if r not in wrote and (r not in ended or ended[r].get("signal"))]
    if failed and silent and all(r.get("comm") for r in failed):
        who = ", ".join(map(str, silent))
        return (
            f"rank {who} stopped responding (hung, or stopped: the other ranks gave up waiting "
            f"for it after launch.timeout_s); first error: rank {failed[0]['rank']}: "
            f"{failed[0]['error']}"
        )
    if failed:
        return f"rank {failed[0]['rank']} failed first: {failed[0]['error']}"
    exited = sorted((v["time"], rank, v["exitcode"]) for rank, v in ended.items())
    if exited:
        _, rank, code = exited[0]
        return f"rank {rank} exited with status {code} without saying why (see its output above)"
    return None


# ---------------------------------------------------------------- what the terminal shows

LAUNCH_LOG_DIR = "logs"  # OUTPUT/logs/launch-TIMESTAMP.log: torchrun's and every rank's stderr
# torchrun's own log lines (glog style: W1130 05:43:51.766000 18637 torch/distributed/run.py:874])
TORCHRUN_LOG_LINE = re.compile(rb"^[IWEF]\d{4} [\d:.]+ +\d+ torch/")
RANK_EXCEPTHOOK = re.compile(rb"^\[rank\d+\]: ")  # torch prefixes a rank's uncaught traceback
TRACEBACK_START = b"Traceback (most recent call last):"
TRACEBACK_LINKS = (b"During handling of the above exception", b"The above exception was")
DECIDE_AFTER = 48  # bytes of an unfinished line enough to tell whether it is one of those
MAY_BE_HELD_BACK = (b"T", b"[", b"I", b"W", b"E", b"F")  # the first bytes of those lines


def launch_log_path(output_dir: Path, nnodes: int, node_rank: int) -> Path:
    """Where `lockstep train` keeps torchrun's and the ranks' stderr of this launch: a new file
    per launch (a resumed run keeps its earlier logs), one per node on a shared output_dir."""
    node = f"-node{node_rank}" if nnodes > 1 else ""
    return output_dir / LAUNCH_LOG_DIR / f"launch-{time.strftime('%Y%m%d-%H%M%S')}{node}.log"


class LaunchOutput:
    """torchrun's stderr (its own and, inherited, every rank's), split between the launch log
    and the terminal. The log gets every byte. The terminal gets the run live (rank 0's
    progress bar and log lines, any warning) less what lockstep sums up in one line itself:
    - Python tracebacks (a rank's, torch's `[rankN]:` copy of it, torchrun's own);
    - torchrun's log lines: its OMP_NUM_THREADS banner, the signals it sends its workers, its
      account of a failure;
    - everything after `failed()` turns true (a rank wrote its failure record): the other
      ranks' errors are consequences, and `lockstep train` names the cause.

    Lines are decided at their start (a progress bar is redrawn after a carriage return and
    shown at once, not at its newline). `last_error` keeps the last line of the last traceback
    held back: the words of a failure no rank recorded (torchrun's own, a rendezvous).
    """

    def __init__(self, log: BinaryIO, terminal: BinaryIO, failed: Callable[[], bool]) -> None:
        self.log, self.terminal, self.failed = log, terminal, failed
        self.pending = b""  # the start of a line, too short yet to decide
        self.show: bool | None = None  # the decision for the rest of the current line
        self.in_traceback = False
        self.at_line_start = True  # the terminal's cursor is at the start of a line
        self.last_error = ""

    def feed(self, chunk: bytes) -> None:
        self.log.write(chunk)
        self.log.flush()
        data, self.pending = self.pending + chunk, b""
        if self.show is not None and self._held_back_start(data):
            self.show = None  # another process's traceback or torchrun's line, after a bar
        if self.show:  # a line shown so far may go on with a failing rank's words
            self.show = not self.failed()
        pieces = [p for p in re.split(rb"(?<=\n)|(?<=\r)|(?=\r)", data) if p]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            ends = not last or piece.endswith((b"\n", b"\r"))  # a line ends at \n or \r
            if self.show is None:
                if not ends and len(piece) < DECIDE_AFTER and piece.startswith(MAY_BE_HELD_BACK):
                    self.pending = piece
                    break
                self.show = self._decide(piece.rstrip(b"\r\n"))
            if self.show:
                self.terminal.write(piece)
                self.at_line_start = piece.endswith(b"\n")
            if ends:
                self.show = None
        self.terminal.flush()

    def close(self) -> None:
        """The stream ended: decide what was left unfinished."""
        if self.pending:
            pending, self.pending = self.pending, b""
            self.show = self._decide(pending)
            if self.show:
                self.terminal.write(pending)
                self.at_line_start = False
            self.terminal.flush()

    def end_line(self) -> None:
        """Move the terminal to a fresh line (after a progress bar) before lockstep's own."""
        if not self.at_line_start:
            self.terminal.write(b"\n")
            self.terminal.flush()
            self.at_line_start = True

    @staticmethod
    def _held_back_start(data: bytes) -> bool:
        """`data` starts a traceback or one of torchrun's lines."""
        text = RANK_EXCEPTHOOK.sub(b"", data[:DECIDE_AFTER])
        return text.startswith(TRACEBACK_START) or bool(
            RANK_EXCEPTHOOK.match(data) or TORCHRUN_LOG_LINE.match(data)
        )

    def _decide(self, line: bytes) -> bool:
        text = RANK_EXCEPTHOOK.sub(b"", line)
        if self.in_traceback:
            if text[:1].isspace() or not text.strip() or text.startswith(TRACEBACK_LINKS):
                return False
            if not text.startswith(TRACEBACK_START):
                self.in_traceback = False
                self.last_error = text.decode(errors="replace").strip()
            return False
        if text.startswith(TRACEBACK_START):
            self.in_traceback = True
            return False
        if RANK_EXCEPTHOOK.match(line) or TORCHRUN_LOG_LINE.match(line):
            return False
        return not self.failed()
