"""One error hierarchy: every failure a user can fix ends as one of these, printed in words."""

import argparse


class LockstepError(Exception):
    """Base of every error lockstep reports as `lockstep: error: ...` (no traceback)."""


class ConfigError(LockstepError):
    """The run config (file, override or combination of values) is wrong."""


class DataError(LockstepError):
    """A data file or record cannot be used."""


class DatasetError(DataError):
    """A whole dataset cannot be used as configured: stops the run even with
    data.on_bad_record=skip, where skipping every record would hide the one cause."""


class ModelError(LockstepError):
    """The model or tokenizer cannot be loaded or used as configured."""


class LaunchError(LockstepError):
    """The process world cannot be planned or started as asked."""


class CheckpointError(LockstepError):
    """A checkpoint cannot be written or read."""


class TrainingError(LockstepError):
    """Training cannot go on (non-finite loss, a rank failed, ranks out of lockstep)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception from another library: enough to say what went wrong in
    one line of lockstep's own error."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0] or type(e).__name__)[:limit]


def reason(e: BaseException) -> str:
    """Why an operation failed, in a few words: an OSError's strerror ("No space left on
    device", without the errno and path that the caller's message names itself), else the
    first line of the error."""
    return getattr(e, "strerror", None) or first_line(e)


def add_traceback_flag(parser: argparse.ArgumentParser, shown: bool = True) -> None:
    """--traceback, on every command (read by show_traceback when an error is reported);
    `shown`: listed in the command's --help."""
    parser.add_argument(
        "--traceback", action="store_true",
        help="show the traceback of an error" if shown else argparse.SUPPRESS,
    )  # fmt: skip


def show_traceback(flag: bool = False) -> bool:
    """--traceback, or LOCKSTEP_TRACEBACK=1 (read when an error happens, never at import)."""
    import os

    return flag or os.environ.get("LOCKSTEP_TRACEBACK", "") not in ("", "0")


def report(err: LockstepError, traceback_flag: bool = False, prefix: str = "") -> int:
    """Print `lockstep: error: ...` on stderr and return the exit code."""
    import sys
    import traceback

    if show_traceback(traceback_flag):
        traceback.print_exception(err)
    print(f"lockstep: error: {prefix}{err}", file=sys.stderr, flush=True)
    return 1
