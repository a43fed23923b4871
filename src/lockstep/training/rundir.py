"""One run per output folder: rank 0 holds a lock on OUTPUT/.lockstep.lock for the run's life.

Two runs writing into one output_dir would interleave their metrics.jsonl and checkpoints, and
the second would delete the first one's checkpoint in progress as a leftover. The lock is an OS
advisory record lock (fcntl.lockf): the kernel releases it when the holding process ends in any
way (a crash, kill -9), so a lock file left behind never blocks a later run; and unlike flock
it is not inherited by the processes the run forks (data workers), which could outlive it. The
file holds the holder's pid, host and start time, for the error a second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as tdist

from lockstep.dist import Dist
from lockstep.errors import CheckpointError, reason

LOCK_FILE = ".lockstep.lock"


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says (best effort: it may be being written)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable)"


def acquire(out: Path) -> int:
    """Take the lock of output folder `out` (made if missing); the open file descriptor that
    holds it. Refuses at once, in one line, when another run holds it."""
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CheckpointError(f"output_dir: cannot create {path}: {reason(e)}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(
            f"output_dir {out} is in use by another lockstep run ({_holder(path)}): wait for "
            "it to finish (or stop it), or give this run another output_dir"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


@contextmanager
def hold(out: Path, d: Dist) -> Iterator[None]:
    """The run in the body owns output folder `out`: rank 0 holds its lock, and when rank 0 is
    refused every rank stops with the same error (the others learn it from rank 0)."""
    fd, refusal = None, ""
    if d.is_main:
        try:
            fd = acquire(out)
        except CheckpointError as e:
            refusal = str(e)
    if d.distributed:
        said = [refusal]
        tdist.broadcast_object_list(said, src=0, group=d.wait_group)
        refusal = said[0]
    if refusal:
        raise CheckpointError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays, its content is rewritten next time
