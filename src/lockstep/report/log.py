"""Rank-aware logging: rank 0 says what happens; other ranks speak up only for warnings."""

from __future__ import annotations

import logging
import sys

LOGGER = "lockstep"


class BarAwareHandler(logging.StreamHandler):
    """Writes each line through tqdm: a progress bar on the same stream is lifted, the line
    printed on a line of its own, and the bar drawn again below it (on a terminal, a line
    written straight would be glued to the bar: `...2.98s/step][lockstep] step 5: ...`)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup(rank: int = 0, world_size: int = 1) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.handlers.clear()
    handler = BarAwareHandler(sys.stderr)
    prefix = "lockstep" if world_size == 1 else f"lockstep rank {rank}"
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


def get() -> logging.Logger:
    return logging.getLogger(LOGGER)
