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
- With a `mixture` (data.train's weight / repeat, data/mixing.py counts it), an epoch is not
  one pass over the n units: dataset d contributes counts[d] units, the next ones of its endless
  stream of passes (pass p a permutation of its units seeded by (seed, d, p, MIX_STREAM)), so
  epoch e takes the stream's units [e*counts[d], (e+1)*counts[d]): no unit repeats within a
  pass, an up-weighted small dataset goes through all its units before any comes again. The
  epoch's units are then shuffled together by permutation(seed, e, E), E = sum(counts), and
  cut into steps as above (ceil(E / G) steps). Dataset d holds the consecutive unit ids
  [start_d, start_d + sizes[d]) (samples are built in the listed order).
- The position in the data is the global step alone, so resuming is instant at any world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

PAD = -1
DATA_STREAM = 0xDA7A
MIX_STREAM = DATA_STREAM + 2  # + 1: the validation split (training/evaluate.py)


@lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, DATA_STREAM])))
    perm = rng.permutation(n)
    perm.setflags(write=False)
    return perm


@dataclass(frozen=True)
class Mixture:
    """Per dataset, in the listed order: its units (`sizes`) and its units per epoch (`counts`)."""

    sizes: tuple[int, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.counts) or not sum(self.counts):
            raise ValueError("a mixture needs one count per dataset, not all zero")
        if any(c and not n for n, c in zip(self.sizes, self.counts, strict=True)):
            raise ValueError("a dataset with no units cannot contribute to an epoch")

    @property
    def epoch_size(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0, *self.sizes[:-1])))


@lru_cache(maxsize=16)
def pass_permutation(seed: int, dataset: int, p: int, n: int) -> np.ndarray:
    """Pass `p` over dataset `dataset`'s n units (local indices), from a private generator."""
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, dataset, p, MIX_STREAM]))
    )
    perm = rng.permutation(n)
    perm.setflags(write=False)
    return perm


def stream(seed: int, dataset: int, n: int, start: int, count: int) -> np.ndarray:
    """Local indices [start, start + count) of the dataset's endless stream of passes."""
    if not count:
        return np.zeros(0, dtype=np.int64)
    first, last = start // n, (start + count - 1) // n
    passes = [pass_permutation(seed, dataset, p, n) for p in range(first, last + 1)]
    joined = np.concatenate(passes)
    return joined[start - first * n : start - first * n + count]


def epoch_units(seed: int, epoch: int, mixture: Mixture) -> np.ndarray:
    """The unit ids epoch `epoch` trains on, in dataset order (`mixed_permutation` shuffles)."""
    rows = zip(mixture.starts, mixture.sizes, mixture.counts, strict=True)
    parts = [start + stream(seed, d, n, epoch * c, c) for d, (start, n, c) in enumerate(rows)]
    return np.concatenate(parts).astype(np.int64)


@lru_cache(maxsize=4)
def mixed_permutation(seed: int, epoch: int, mixture: Mixture) -> np.ndarray:
    """Epoch `epoch`'s unit ids as its steps take them: `epoch_units` in the order
    permutation(seed, epoch, E) gives, E = mixture.epoch_size."""
    order = epoch_units(seed, epoch, mixture)[permutation(seed, epoch, mixture.epoch_size)]
    order.setflags(write=False)
    return order


@dataclass(frozen=True)
class Order:
    seed: int
    num_samples: int
    global_size: int
    micro_size: int
    world_size: int = 1
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Sample lengths: when given, micro-batches are grouped by length (see above)."""
    mixture: Mixture | None = None
    """Units per dataset and per epoch (data/mixing.py); None: an epoch is one pass over all."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("no samples to order")
        if self.global_size % (self.micro_size * self.world_size):
            raise ValueError("global_size must be a multiple of micro_size * world_size")
        if self.mixture is not None and sum(self.mixture.sizes) != self.num_samples:
            raise ValueError("the mixture's datasets do not hold num_samples units")

    @property
    def epoch_size(self) -> int:
        """Units per epoch: all of them once, or what the mixture takes of each dataset."""
        return self.mixture.epoch_size if self.mixture is not None else self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.epoch_size // self.global_size)

    @property
    def accumulation(self) -> int:
        return self.global_size // (self.micro_size * self.world_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """The G slots of optimizer step `step` (0-based, counted over all epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        ids = self.epoch_order(epoch)[k * self.global_size : (k + 1) * self.global_size]
        pad = np.full(self.global_size - len(ids), PAD, dtype=np.int64)
        return np.concatenate([ids.astype(np.int64), pad])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The unit ids of epoch `epoch`, in the order its steps take them."""
        if self.mixture is None:
            return permutation(self.seed, epoch, self.num_samples)
        return mixed_permutation(self.seed, epoch, self.mixture)

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
