"""The data order: a pure function of (seed, epoch, step, rank, world). Nothing else.

Rules (the README explains them for users):
- Epoch e visits the samples in `permutation(seed, e, n)`, drawn from a private generator seeded
  by (seed, e, DATA_STREAM): never from the global random/numpy/torch state.
- An epoch has ceil(n / G) optimizer steps (G = batch.global_size). Step k of the epoch trains on
  the global batch perm[k*G:(k+1)*G]. The last batch of an epoch may be partial: every sample is
  seen exactly once per epoch, none is dropped, none repeated. Its empty slots are PAD (-1) and
  carry no target tokens, so the token-normalised loss is a true mean over the real samples.
- The global batch (G slots) is cut into G / m micro-batches of m slots. Micro-batch j is
  slots [j*m, (j+1)*m); rank r at accumulation index a trains on micro-batch j = a*W + r.
  Hence the set of samples in an optimizer step does not depend on the world size W or on the
  accumulation A = G / (m*W): only on (seed, step).
- With `lengths` (data.group_by_length), the slots of a global batch are first sorted by sample
  length (longest first, ties by id, PAD last), then cut the same way: micro-batches hold
  samples of similar length, so less padding. The step's set of samples is unchanged.
- The position in the data is the global step alone, so resuming is instant at any world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

PAD = -1
DATA_STREAM = 0xDA7A


@lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, DATA_STREAM])))
    perm = rng.permutation(n)
    perm.setflags(write=False)
    return perm


@dataclass(frozen=True)
class Order:
    seed: int
    num_samples: int
    global_size: int
    micro_size: int
    world_size: int = 1
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Sample lengths: when given, micro-batches are grouped by length (see above)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("no samples to order")
        if self.global_size % (self.micro_size * self.world_size):
            raise ValueError("global_size must be a multiple of micro_size * world_size")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_size)

    @property
    def accumulation(self) -> int:
        return self.global_size // (self.micro_size * self.world_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """The G slots of optimizer step `step` (0-based, counted over all epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        ids = permutation(self.seed, epoch, self.num_samples)[
            k * self.global_size : (k + 1) * self.global_size
        ]
        pad = np.full(self.global_size - len(ids), PAD, dtype=np.int64)
        return np.concatenate([ids.astype(np.int64), pad])

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """The micro-batches rank `rank` trains on at `step`, in accumulation order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        slots = self.global_batch(step)
        if self.lengths is not None:
            slots = group_by_length(slots, self.lengths)
        slots = slots.reshape(-1, self.micro_size)
        return [slots[a * self.world_size + rank] for a in range(self.accumulation)]


def group_by_length(slots: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The slots, longest sample first (ties: lower id first), PAD slots last."""
    key = np.where(slots == PAD, 1, -lengths[np.maximum(slots, 0)])
    return slots[np.lexsort((slots, key))]


def batch_sha(ids: np.ndarray) -> str:
    """Hash of the sorted real sample ids of a global batch: what an optimizer step trained on."""
    real = np.sort(ids[ids != PAD]).astype("<i8")
    return hashlib.sha256(real.tobytes()).hexdigest()[:16]
