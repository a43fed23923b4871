"""The `lockstep` command tree."""

from __future__ import annotations

import argparse
import json
import sys

from lockstep import __version__
from lockstep.errors import LockstepError, report


def _cmd_train(args: argparse.Namespace) -> int:
    from lockstep import train

    return train.run(args)


def _cmd_env(args: argparse.Namespace) -> int:
    from lockstep.report import env

    info = env.collect()
    print(json.dumps(info, indent=2) if args.json else env.render(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lockstep.train import add_run_args

    parser = argparse.ArgumentParser(
        prog="lockstep",
        description="Fine-tune Hugging Face causal LMs from one YAML file, every rank in lockstep.",
    )
    parser.add_argument("--version", action="version", version=f"lockstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config file")
    add_run_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("env", help="versions, devices, and where lockstep is imported from")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LockstepError as e:
        return report(e, args.traceback)
    except KeyboardInterrupt:
        print("lockstep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
