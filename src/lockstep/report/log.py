"""Rank-aware logging: rank 0 says what happens; other ranks speak up only for warnings."""

from __future__ import annotations

import logging
import sys

LOGGER = "lockstep"


def setup(rank: int = 0, world_size: int = 1) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    prefix = "lockstep" if world_size == 1 else f"lockstep rank {rank}"
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


def get() -> logging.Logger:
    return logging.getLogger(LOGGER)
