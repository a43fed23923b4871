"""Samples -> padded tensors for one micro-batch. Labels are shifted here, once."""

from __future__ import annotations

import numpy as np
import torch

from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.data.render import IGNORE


def collate(samples: Samples, ids: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. A PAD slot becomes a one-token row with no targets.

    `labels[i, t]` is the target for position t (the token at t+1), IGNORE where nothing is
    trained, so the loss is a plain sum over positions with no shifting inside the model.
    """
    rows = [(samples.input_ids[i], samples.labels[i]) if i != PAD else None for i in ids]
    width = max((len(r[0]) for r in rows if r is not None), default=1)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        if row is None:
            attention[j, 0] = 1
            continue
        toks, labs = row
        input_ids[j, : len(toks)] = toks
        labels[j, : len(toks) - 1] = labs[1:]
        attention[j, : len(toks)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention),
    }
