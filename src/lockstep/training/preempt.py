"""Preemption: SIGTERM or SIGINT finishes the current optimizer step, saves, and exits.

Every rank checks the flag after each step through one all-reduce, so a signal that reached only
some ranks still stops all of them at the same step. A second SIGINT aborts at once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from lockstep.dist import Dist


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint (not an error)."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        if path is None:  # a replay (--as-rank) writes no checkpoints
            super().__init__(f"stopped by {name} after step {step} (a replay saves nothing)")
            return
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved in {path}. "
            "Run the same command again to continue from it (checkpoint.resume=auto)."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            print("lockstep: second interrupt, aborting now", file=sys.stderr, flush=True)
            os._exit(130)
        if self.signum is None:
            self.signum = signum
            print(
                f"lockstep: {signal.Signals(signum).name} received: finishing this step, then "
                "saving a checkpoint (interrupt again to abort at once)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self, d: Dist) -> int | None:
        """The signal any rank received (the same answer on every rank), or None."""
        if not d.distributed:
            return self.signum
        t = torch.tensor([self.signum or 0], dtype=torch.int64)
        if d.device.type == "cuda":
            t = t.to(d.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item()) or None
