"""log.profile: where the time of chosen training steps goes, by phase and by operator.

`log.profile: [first, last]` (optimizer steps counted from 1, both included) runs torch.profiler
over those steps on every rank and writes, for rank r, to OUTPUT/profile/ (a replay, --as-rank
R/W, writes rank{R}-replay.*):

- rank{r}.trace.json: the timeline (open it in ui.perfetto.dev or chrome://tracing); every phase
  below is a named range (`lockstep.forward`, ...) around the operators it ran;
- rank{r}.ops.txt: the operators, by their own time (self CPU time; on CUDA, self device time);
- rank{r}.json: the steps, the phases' seconds and shares, and the top operators.

The phases of a step, in the order they run:

- data: the step's global batch and its token counts (the loss's denominator); each
  micro-batch (collated in the loader), its objective's preparation, the copy to the device;
- forward, backward: of each micro-batch (the loss, chunked LM head included, is in forward);
- step: the ranks' sum of the loss, gradient clipping, the optimizer and the scheduler;
- after: what follows a step: the metrics row, evaluation, a checkpoint.

`other` is the profiled wall time that no phase holds. On CUDA the device is synchronised at
each phase boundary of a profiled step, so a phase's seconds are the device's work, not only the
host's launches. Outside the profiled steps a phase costs one attribute check. The profiler
records every operator, which slows the profiled steps: read the shares, not their speed.
Rank 0 logs one line: the shares and the heaviest operators.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("data", "forward", "backward", "step", "after")
TOP_OPS = 15  # operators kept in rank{r}.json


@dataclass
class Profile:
    """The profiler of one rank: idle until the first profiled step, then recording, then done."""

    steps: tuple[int, int] | None  # (first, last) optimizer steps, counted from 1; None: never
    folder: Path  # OUTPUT/profile
    name: str  # the files' stem: rank{r}
    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    profiler: profile | None = None  # recording now
    began: float = 0.0  # perf_counter() when recording began
    profiled: tuple[int, int] | None = None  # the steps recorded (a resume may start later)

    @property
    def recording(self) -> bool:
        return self.profiler is not None

    def begin(self, step: int) -> None:
        """Step `step` (counted from 1) is about to run: record it if it is the first one of
        log.profile still to come."""
        if self.steps is None or self.recording or self.profiled is not None:
            return
        first, last = self.steps
        if not first <= step <= last:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities)
        self.profiler.start()
        self.profiled = (step, last)
        self._sync()
        self.began = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A phase of a step (PHASES): a named range in the trace and its seconds, while
        recording; nothing otherwise."""
        if self.profiler is None:
            yield
            return
        self._sync()
        t = time.perf_counter()
        with record_function(f"lockstep.{name}"):
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - t

    def end(self, step: int) -> dict | None:
        """Step `step` is done: after the last profiled one, stop and write the files; their
        summary (rank{r}.json's content), else None."""
        if self.profiler is None or self.profiled is None or step != self.profiled[1]:
            return None
        self._sync()
        wall = time.perf_counter() - self.began
        prof, self.profiler = self.profiler, None
        prof.stop()
        return self.write(prof, wall)

    def close(self) -> None:
        """The run ends before the last profiled step (a failure, a stop): drop the recording."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def write(self, prof: profile, wall: float) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / self.name
        prof.export_chrome_trace(str(stem) + ".trace.json")
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        (stem.parent / f"{stem.name}.ops.txt").write_text(
            averages.table(sort_by=key, row_limit=60), encoding="utf-8"
        )
        summary = summarise(self.seconds, wall, self.profiled, top_ops(averages, key))
        (stem.parent / f"{stem.name}.json").write_text(
            json.dumps(summary, indent=1) + "\n", encoding="utf-8"
        )
        return summary

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def out_of_reach(steps: tuple[int, int] | None, start_step: int, last_step: int) -> str | None:
    """Why none of log.profile's steps will run in this process (steps done before it:
    `start_step`; the run's last step: `last_step`), with what to write instead; None when one
    will."""
    if steps is None:
        return None
    first, last = steps
    nearest = (start_step + 2, start_step + 3) if start_step + 3 <= last_step else None
    instead = (
        f"; profile later steps, e.g. log.profile=[{nearest[0]}, {nearest[1]}]" if nearest else ""
    )
    if last <= start_step:
        return (f"log.profile=[{first}, {last}] profiles nothing: this run resumes after step "
                f"{start_step}{instead}")  # fmt: skip
    if first > last_step:
        return (f"log.profile=[{first}, {last}] profiles nothing: the run ends at step "
                f"{last_step}; choose steps up to {last_step}")  # fmt: skip
    return None


def top_ops(averages, key: str) -> list[dict]:
    """The heaviest operators by their own time (`key`: self CPU or self device time), the
    profiler's own ranges (lockstep's phases, ProfilerStep) left out."""
    ops = [e for e in averages if not e.key.startswith(("lockstep.", "ProfilerStep"))]
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {"op": e.key, "self_s": round(getattr(e, key) / 1e6, 6), "calls": e.count}
        for e in ops[:TOP_OPS]
    ]


def summarise(seconds: dict[str, float], wall: float, steps, ops: list[dict]) -> dict:
    """The phases' seconds and shares of the profiled `wall` time (other: what no phase
    holds), and the top operators with their share of the same wall time."""
    phased = dict(seconds)
    phased["other"] = max(wall - sum(seconds.values()), 0.0)
    return {
        "steps": list(steps),
        "wall_s": round(wall, 6),
        "seconds": {k: round(v, 6) for k, v in phased.items()},
        "share": {k: round(v / wall, 4) if wall > 0 else 0.0 for k, v in phased.items()},
        "top_ops": [{**op, "share": round(op["self_s"] / wall, 4) if wall else 0.0} for op in ops],
    }


def describe(summary: dict, folder: Path, name: str) -> str:
    """One log line: the shares of the phases, the five heaviest operators, the files."""
    first, last = summary["steps"]
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    phases = ", ".join(
        f"{k} {v:.0%}" for k, v in sorted(summary["share"].items(), key=lambda kv: -kv[1])
    )
    ops = ", ".join(f"{op['op']} {op['share']:.0%}" for op in summary["top_ops"][:5])
    return (
        f"profile of {steps} ({name}, {summary['wall_s']:.2f}s while profiled): {phases}; "
        f"heaviest operators (own time): {ops}; trace, operators and numbers in {folder}/"
    )
