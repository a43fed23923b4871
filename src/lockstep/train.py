"""The training entry for one process: `python -m lockstep.train cfg.yaml [key=value ...]`.

torchrun starts this module on every rank; an IDE can run or debug this file directly.
Imports are absolute so the file runs as a script too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a file (an IDE's "run this file"): import lockstep from the source tree, and keep
    # this folder off sys.path so that data/, model/ do not shadow other packages' modules
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lockstep import config as config_mod  # noqa: E402
from lockstep import dist, launch  # noqa: E402
from lockstep.data.dataset import check_files  # noqa: E402
from lockstep.errors import (  # noqa: E402
    LaunchError,
    LockstepError,
    add_traceback_flag,
    first_line,
    report,
)
from lockstep.model import adapters  # noqa: E402
from lockstep.report import log as logmod  # noqa: E402
from lockstep.training import parallel  # noqa: E402
from lockstep.training.options import RunOptions, parse_as_rank  # noqa: E402
from lockstep.training.preempt import Preempted  # noqa: E402


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lockstep train` and `python -m lockstep.train`."""
    p.add_argument("config", help="run config (YAML or JSON)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-4")
    add_traceback_flag(p)
    p.add_argument(
        "--debug", action="store_true",
        help="one process, same global batch, deterministic, stop at the first non-finite "
        "loss (also LOCKSTEP_DEBUG=1)",
    )  # fmt: skip
    p.add_argument(
        "--as-rank", metavar="R/W",
        help="with --debug: replay exactly the micro-batches rank R of a W-process run sees",
    )  # fmt: skip
    p.add_argument(
        "--debug-rank", type=int, metavar="R",
        help="rank R waits for a debugger (debugpy) on port 5678+R (also LOCKSTEP_DEBUG_RANK)",
    )  # fmt: skip


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Overrides may come before or after flags: `cfg.yaml --debug optim.lr=1e-4`."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def options(args: argparse.Namespace) -> RunOptions:
    debug = launch.debug_requested(args.debug)
    as_rank = parse_as_rank(args.as_rank) if args.as_rank else None
    if as_rank and not debug:
        raise LaunchError("--as-rank replays one rank in one process: add --debug")
    env_rank = os.environ.get("LOCKSTEP_DEBUG_RANK", "")
    debug_rank = args.debug_rank if args.debug_rank is not None else (
        int(env_rank) if env_rank.isdigit() else None
    )  # fmt: skip
    if debug_rank is not None:
        _check_debugger()
    return RunOptions(debug=debug, as_rank=as_rank, debug_rank=debug_rank)


def _check_debugger() -> None:
    """--debug-rank needs debugpy: say so before any process starts (not as the failure of one
    rank among several, whose peers then fail waiting for it)."""
    import importlib.util

    if importlib.util.find_spec("debugpy") is None:
        from lockstep import DISTRIBUTION

        raise LaunchError(
            f"--debug-rank needs debugpy: pip install '{DISTRIBUTION}[debug]' "
            "(or pip install debugpy)"
        )


def load_checked(args: argparse.Namespace) -> config_mod.RunConfig:
    """The run config `args` names (file and overrides), validated, its data files checked:
    what a process checks first, once (`lockstep train` passes the result on to `run`)."""
    from lockstep import trackers
    from lockstep.training.evaluate import check_eval_files

    cfg = adapters.resolve_init_from(config_mod.load(args.config, args.overrides))
    check_files(cfg.data)
    check_eval_files(cfg)
    trackers.check_installed(cfg.log)
    return cfg


def run(
    args: argparse.Namespace, cfg: config_mod.RunConfig | None = None, via_lockstep: bool = False
) -> int:
    """Train in this process (one rank of the world torchrun made, or a world of one).

    `cfg`: the config as load_checked gave it to `lockstep train` in this process; None (a
    torchrun rank, `python -m lockstep.train`): read and checked here, before any work.
    """
    if cfg is None:
        cfg = load_checked(args)
    adapters.check_supported(cfg.finetune)
    parallel.check_supported(cfg)
    opts = options(args)
    how = launch.launcher(os.environ, via_lockstep)
    refusal = launch.guard(how, launch.visible_gpus(), opts.debug)
    if refusal:
        raise LaunchError(refusal)
    if opts.debug and how == "torchrun" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LaunchError("--debug runs one process; start it without torchrun")
    d = dist.setup(cfg.launch.timeout_s)
    logmod.setup(d.rank, d.world_size)
    finished = False  # every rank got to the end of the run together (the final wait is safe)
    try:
        logmod.get().info(prepare_device(d))
        if opts.debug:
            _enter_debug_mode(cfg, opts)
        else:
            config_mod.check_world(cfg, d.world_size)
        if opts.debug_rank is not None and opts.debug_rank == d.rank:
            _wait_for_debugger(d.rank)
        from lockstep.training import rundir
        from lockstep.training.loop import run as train_loop

        with rundir.hold(Path(cfg.output_dir), d):  # one run per output_dir at a time
            train_loop(cfg, d, opts)
        finished = True
    except Preempted:
        finished = True  # every rank stops after the same step's checkpoint
        raise
    finally:
        dist.teardown(d, finished)
    return 0


def prepare_device(d: dist.Dist) -> str:
    """The start-up line naming this rank's device; on the CPU, the intra-op threads are chosen
    first (lockstep.threads: the user's count, else the cores other work leaves free)."""
    import torch

    from lockstep import threads

    if d.device.type == "cuda":
        props = torch.cuda.get_device_properties(d.device)
        return threads.gpu_line(str(d.device), props.name, props.total_memory)
    return threads.cpu_line(*threads.setup_cpu(os.environ))


def _enter_debug_mode(cfg: config_mod.RunConfig, opts: RunOptions) -> None:
    import torch

    world = opts.as_rank[1] if opts.as_rank else 1
    config_mod.check_world(cfg, world)
    torch.use_deterministic_algorithms(True)
    g, m = cfg.batch.global_size, cfg.batch.micro_size
    planned = cfg.launch.nproc_per_node
    replay = (
        f"replaying rank {opts.as_rank[0]} of {opts.as_rank[1]}: its {g // (m * world)} "
        f"micro-batch(es) per step, in its order"
        if opts.as_rank
        else f"global batch {g} kept: {g // m} micro-batches of {m} accumulated in this process"
    )
    banner = [
        "debug mode:",
        f"  one process on one device (launch.nproc_per_node={planned} ignored)",
        f"  {replay}",
        "  data loading in this process (no workers): breakpoints in data code work",
        "  deterministic algorithms on",
        "  the run stops at the first non-finite loss or gradient, naming the step",
    ]
    print("\n".join(banner), file=sys.stderr, flush=True)


def _wait_for_debugger(rank: int) -> None:
    import debugpy  # options() checked it is installed

    port = 5678 + rank
    debugpy.listen(("127.0.0.1", port))
    print(f"[rank {rank}] waiting for a debugger on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    debugpy.wait_for_client()


def _record_failure(err: BaseException) -> None:
    """Tell `lockstep train` which rank failed and why (it names the first one)."""
    folder = os.environ.get(launch.FAILURE_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    # lockstep's own errors are said in full (the out-of-lockstep table); others in one line
    said = str(err).strip() if isinstance(err, LockstepError) else first_line(err)
    record = {"rank": rank, "time": time.time(), "error": said or type(err).__name__}
    if _between_ranks(err):
        record["comm"] = True
    if isinstance(err, Preempted):
        record["preempted"] = err.exit_code
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(record))


def _between_ranks(err: BaseException) -> bool:
    """An error of the communication between ranks (a peer gone, a timeout): a consequence of
    another rank's failure more often than a cause."""
    import torch.distributed as tdist

    text = str(err).lower()
    return isinstance(err, tdist.DistError) or any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.train", description=__doc__)
    add_run_args(parser)
    args = parse(parser, argv)
    if all(k in os.environ for k in launch.TORCHRUN_ENV):
        launch.die_with_parent(signal.SIGKILL)  # a worker never outlives its launcher
    prefix = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    try:
        return run(args)
    except Preempted as e:
        _record_failure(e)
        if prefix in ("", "rank 0: "):
            print(f"lockstep: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except LockstepError as e:
        _record_failure(e)
        return report(e, args.traceback, prefix)
    except Exception as e:
        _record_failure(e)
        raise


if __name__ == "__main__":
    sys.exit(main())
