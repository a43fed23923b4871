"""Dataset mixing: how many units of each data.train dataset an epoch trains on. Pure functions.

Rules (the README's "Mixing datasets" explains them for users):
- Without `weight` or `repeat` on any data.train entry there is no mixture: an epoch is one
  pass over all the units (data/order.py, unchanged).
- `repeat: k` on entries (the others count as k = 1): dataset d contributes
  c_d = max(1, round(k x n_d)) units per epoch (halves round up), n_d being its units.
- `weight: w` on every entry: the epoch keeps the size of one pass over all the data,
  N = sum(n_d), and dataset d contributes its share w_d / sum(w) of it: floor(N x share), then
  one more unit to the datasets with the largest remainders (ties: the one listed first) until
  the counts sum to N. Exact fractions, so every process computes the same integers.
- Which units an epoch takes of each dataset, and in which order, is the data order's
  (data/order.py: Mixture, epoch_units): a pure function of (seed, epoch, sizes, counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from lockstep.data.dataset import Samples
from lockstep.data.order import Mixture
from lockstep.errors import DataError


def configured(train: Sequence) -> bool:
    """Whether any data.train entry sets weight or repeat (else: no mixture)."""
    return any(ds.weight is not None or ds.repeat is not None for ds in train)


def counts(train: Sequence, sizes: Sequence[int]) -> tuple[int, ...]:
    """Each dataset's units per epoch by the rules above (config.py refused bad combinations)."""
    if any(ds.weight is not None for ds in train):
        return weighted([ds.weight for ds in train], sizes)
    return tuple(
        max(1, math.floor(Fraction(ds.repeat or 1) * n + Fraction(1, 2))) if n else 0
        for ds, n in zip(train, sizes, strict=True)
    )


def weighted(weights: Sequence[float], sizes: Sequence[int]) -> tuple[int, ...]:
    """sum(sizes) units shared by `weights` (largest remainders, ties to the first listed)."""
    total, ws = sum(sizes), [Fraction(w) for w in weights]
    quotas = [total * w / sum(ws) for w in ws]
    out = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(ws)), key=lambda d: (-(quotas[d] - out[d]), d))
    for d in by_remainder[: total - sum(out)]:
        out[d] += 1
    return tuple(out)


def unit_datasets(samples: Samples, pairs: bool) -> np.ndarray:
    """Each unit's data.train index: a sample's (a row's), or, `pairs`, a pair's (its chosen
    row's; a trailing half pair is no unit)."""
    rows = samples.datasets()
    return rows[0 : 2 * (len(rows) // 2) : 2] if pairs else rows


def of(train: Sequence, units: np.ndarray) -> Mixture | None:
    """The mixture of data.train over units whose dataset indices are `units` (in order,
    non-decreasing: samples are built in the listed order); None when no entry mixes.
    DataError when a dataset given a share holds no units."""
    if not configured(train):
        return None
    if len(units) and (np.diff(units) < 0).any():
        raise ValueError("the units are not grouped by dataset")
    sizes = tuple(int(n) for n in np.bincount(units, minlength=len(train)))
    mixed = counts(train, sizes)
    for i, (n, c) in enumerate(zip(sizes, mixed, strict=True)):
        if c and not n:
            raise DataError(
                f"data.train.{i} ({train[i].path}) has no usable samples left, but its weight "
                "gives it a share of each epoch: fix the dataset, or set its weight to 0"
            )
    return Mixture(sizes, mixed)


def table(train: Sequence, samples: Samples, pairs: bool, mixture: Mixture | None) -> list[str]:
    """The start-up log's and `lockstep data preview`'s lines, one per dataset (`describe`):
    with a mixture, or several datasets read once each; none for one dataset read once, or
    packs that hold several datasets' samples (data.packing without a mixture)."""
    units = unit_datasets(samples, pairs)
    if mixture is None:
        if len(train) < 2 or (units < 0).any():
            return []
        sizes = tuple(int(n) for n in np.bincount(units, minlength=len(train)))
        mixture = Mixture(sizes, sizes)
    source = samples.datasets()
    tokens = np.bincount(source, weights=samples.lengths(), minlength=len(train))
    unit = "pairs" if pairs else "packed sequences" if samples.packed else "samples"
    paths = [ds.path for ds in train]
    return describe(paths, mixture, [int(t) for t in tokens], unit)


def describe(paths: Sequence[str], mixture: Mixture, tokens: Sequence[int], unit: str) -> list[str]:
    """One line per dataset: its units and tokens, what an epoch takes of it and its share."""
    lines = []
    for path, n, c, t in zip(paths, mixture.sizes, mixture.counts, tokens, strict=True):
        passes = f"{c / n:.2f} passes" if n else "empty"
        share = c / mixture.epoch_size
        lines.append(
            f"{path}: {n} {unit}, {t} tokens; {c} {unit} per epoch ({share:.1%} of "
            f"{mixture.epoch_size}, {passes})"
        )
    return lines
