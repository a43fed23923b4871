"""metrics.jsonl: one JSON object per logged step, flushed as it is written; the one place that
also hands every row to the run's trackers (lockstep.trackers: TensorBoard, W&B, MLflow)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lockstep.trackers import Tracker


class MetricsWriter:
    """metrics.jsonl, and the same rows' numbers, at the same steps, to `trackers` (rank 0's;
    `enabled` false: this rank writes nothing). A tracker that fails while logging is warned
    about once and left out from then on: it does not stop the training."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Sequence[Tracker] = ()) -> None:
        self.path = path
        self.enabled = enabled
        self._f = path.open("a", encoding="utf-8") if enabled else None
        self.trackers = list(trackers) if enabled else []

    def write(self, row: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        if self.trackers:
            from lockstep.trackers import scalars

            values = scalars(row)
            for tracker in list(self.trackers):
                try:
                    tracker.log(row["step"], values)
                except Exception as e:  # a tracker's own failure (a server gone, a full disk)
                    self._drop(tracker, e)

    def run_ids(self) -> dict[str, str]:
        """{tracker: its run id}, for the checkpoint's state.json (a resume continues them)."""
        return {t.name: t.run_id for t in self.trackers if t.run_id}

    def _drop(self, tracker: Tracker, error: Exception) -> None:
        from lockstep.errors import first_line
        from lockstep.report import log as logmod

        self.trackers.remove(tracker)
        logmod.get().warning(
            f"log.trackers: {tracker.name} failed to log ({first_line(error)}); training goes "
            f"on without it (metrics.jsonl has every row)"
        )

    def close(self, status: str = "finished") -> None:
        """Close the file and end the trackers' runs as `status`: finished, failed, stopped."""
        if self._f is not None:
            self._f.close()
            self._f = None
        trackers, self.trackers = self.trackers, []
        if trackers:
            from lockstep.trackers import close_all

            close_all(trackers, status)


def read(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run redoes those steps); step 0 empties it."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
