"""metrics.jsonl: one JSON object per logged step, flushed as it is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """metrics.jsonl, and with `tensorboard` a TensorBoard log of the same numbers."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self._f = path.open("a", encoding="utf-8") if enabled else None
        self._tb = _summary_writer(tensorboard) if enabled and tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        if self._tb is not None:
            for key, value in row.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, global_step=row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from lockstep import DISTRIBUTION
        from lockstep.errors import ConfigError

        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: "
            f"pip install '{DISTRIBUTION}[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter(log_dir=str(folder))


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
