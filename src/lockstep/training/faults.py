"""Faults on purpose: the `testing` section, which lockstep's own tests use to prove that a
failure is caught, reported and recovered from. The run calls `inject` once, where its inputs
are settled (training/build.py); nothing else of the training path knows this module.

- `testing.desync: seed | data` on rank `testing.desync_rank`: that rank takes the agreed seed
  plus one, or drops its last training sample. The cross-rank fingerprint check must stop the
  run (dist.check_lockstep).
- `testing.fail_at_step: N` on rank `testing.fail_rank`: the rank raises a TrainingError when
  it draws step N's first micro-batch, as a crashed rank would. The launcher must report it in
  one line, and the run must resume from its last checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from lockstep.config import FaultInjection
from lockstep.data.dataset import Samples
from lockstep.errors import TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class Inputs:
    """What a run is built from, as far as faults reach: the agreed seed and this rank's
    training samples. `fail_at`: the step whose micro-batches raise (see `failing`)."""

    seed: int
    samples: Samples
    fail_at: int | None = None


def inject(testing: FaultInjection, rank: int, inputs: Inputs) -> Inputs:
    """`inputs` as rank `rank` takes them under `testing` (unchanged when it asks for nothing)."""
    if testing.desync and rank == testing.desync_rank:
        if testing.desync == "seed":
            inputs = replace(inputs, seed=inputs.seed + 1)
        else:
            inputs = replace(inputs, samples=inputs.samples.without_last())
    if testing.fail_at_step is not None and rank == testing.fail_rank:
        inputs = replace(inputs, fail_at=testing.fail_at_step)
    return inputs


def failing(batches: Iterator[T], fail_at: int | None, start_step: int, accumulation: int):
    """`batches` (micro-batches of steps start_step+1, ...), raising in place of the first
    micro-batch of step `fail_at` (1-based, as the logs count steps); `batches` itself when
    `fail_at` is None."""
    if fail_at is None or fail_at <= start_step:
        return batches
    return _raise_after(batches, (fail_at - 1 - start_step) * accumulation, fail_at)


def _raise_after(batches: Iterator[T], count: int, step: int) -> Iterator[T]:
    """The first `count` items of `batches`, then the failure (never reached when the run asks
    for no more than `count` items)."""
    yield from itertools.islice(batches, count)
    raise TrainingError(f"injected failure at step {step} (testing.fail_at_step)")
