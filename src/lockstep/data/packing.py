"""Packing: several samples in one sequence of max_length, never attending to each other.

Each packed sample keeps its own position ids (restarting at 0), and the model gets no 2-D
attention mask: transformers then derives a block-diagonal causal mask from the position ids
(sdpa/eager/flex), or flash attention's variable-length kernel runs on the sample boundaries
the batch carries (model/attention.py), so no token sees another sample.
A sample's first label is IGNORE, so the last token of one sample never learns to predict the
first token of the next.

The packing is a deterministic function of the tokenised samples alone (best-fit decreasing,
ties by sample index), so it does not depend on the world size; the order function then
shuffles packs like any samples.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from lockstep.data.dataset import Samples
from lockstep.data.render import IGNORE


def assign(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per pack: best-fit decreasing; each pack's samples in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, pack index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, p = free.pop(at)
            packs[p].append(i)
            bisect.insort(free, (room - n, p))
        else:
            packs.append([i])
            bisect.insort(free, (capacity - n, len(packs) - 1))
    return sorted((sorted(p) for p in packs), key=lambda p: p[0])


def pack(samples: Samples, max_length: int, by_dataset: bool = False) -> Samples:
    """The samples packed (`assign`); `by_dataset` (a data.train mixture): each pack holds the
    samples of one dataset, so the mixture can count packs per dataset. A pack's dataset is
    its samples' one, or -1 when they come from several."""
    lengths, source = [len(x) for x in samples.input_ids], samples.datasets()
    runs = np.flatnonzero(np.diff(source)) + 1 if by_dataset else []
    groups: list[list[int]] = []
    for part in np.split(np.arange(len(source)), runs):
        first = int(part[0])
        groups += [[first + i for i in g] for g in assign([lengths[i] for i in part], max_length)]
    ids, labels, positions = [], [], []
    for group in groups:
        ids.append(np.concatenate([samples.input_ids[i] for i in group]))
        labs = [samples.labels[i].copy() for i in group]
        for lab in labs:
            lab[0] = IGNORE
        labels.append(np.concatenate(labs))
        positions.append(np.concatenate([np.arange(len(samples.input_ids[i])) for i in group]))
    tokens = sum(len(x) for x in ids)
    efficiency = round(tokens / (len(groups) * max_length), 4)
    stats = dataclasses.replace(samples.stats, packing_efficiency=efficiency)
    kinds = [np.unique(source[g]) for g in groups]
    packed = np.array([int(k[0]) if len(k) == 1 else -1 for k in kinds], dtype=np.int64)
    return Samples(ids, labels, samples.fingerprint, stats, positions, packed)
