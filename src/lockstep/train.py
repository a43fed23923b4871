"""The training entry for one process: `python -m lockstep.train cfg.yaml [key=value ...]`.

torchrun starts this module on every rank; an IDE can run or debug this file directly.
Imports are absolute so the file runs as a script too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a file (an IDE's "run this file"): import lockstep from the source tree, and keep
    # this folder off sys.path so that data/, model/ do not shadow other packages' modules
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lockstep import config as config_mod  # noqa: E402
from lockstep import dist  # noqa: E402
from lockstep.errors import LockstepError, report  # noqa: E402
from lockstep.report import log as logmod  # noqa: E402


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lockstep train` and `python -m lockstep.train`."""
    p.add_argument("config", help="run config (YAML or JSON)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-4")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    d = dist.setup()
    logmod.setup(d.rank, d.world_size)
    try:
        config_mod.check(cfg, d.world_size)
        from lockstep.training.loop import run as train_loop

        train_loop(cfg, d)
    finally:
        dist.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.train", description=__doc__)
    add_run_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LockstepError as e:
        return report(e, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
