"""torchrun as `lockstep train` starts it: `python -m lockstep.torchrun TORCHRUN-ARGS`.

The same launcher as `python -m torch.distributed.run`, with two additions for the run's owner:
- it dies with whoever started it (the parent-death signal, see launch.die_with_parent), so a
  killed `lockstep train` leaves no launcher, and through the workers' own parent-death
  signal no worker, training on unattended;
- a Ctrl-C or SIGTERM that stops the run ends it with the signal's exit status, without
  torchrun's traceback of how its signal handler stopped it (the ranks save and say so);
- when workers fail, it writes torchrun's own record of how each of them ended (exit status or
  signal) to LOCKSTEP_FAILURE_DIR/launcher.json: a worker killed by the kernel (SIGKILL from
  the out-of-memory killer) writes nothing itself, and only the launcher saw it die.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from lockstep.launch import FAILURE_DIR_ENV, LAUNCHER_RECORD, die_with_parent


def failures_record(failures: dict) -> dict[str, dict]:
    """{rank: {"exitcode", "signal", "time"}} from torchrun's ProcessFailure objects."""
    record = {}
    for rank, f in failures.items():
        name = None
        if f.exitcode < 0:
            try:
                name = signal.Signals(-f.exitcode).name
            except ValueError:
                name = f"signal {-f.exitcode}"
        record[str(rank)] = {"exitcode": f.exitcode, "signal": name, "time": f.timestamp}
    return record


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    die_with_parent(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        folder = os.environ.get(FAILURE_DIR_ENV)
        if folder:
            Path(folder, LAUNCHER_RECORD).write_text(json.dumps(failures_record(e.failures)))
        return 1
    except SignalException as e:  # torchrun stopped its workers on this signal
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
