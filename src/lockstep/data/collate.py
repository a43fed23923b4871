"""Samples -> padded tensors for one micro-batch. Labels are shifted here, once.

Rows that hold several samples (packed, padding-free) carry position ids that restart at every
sample and no attention mask; with `varlen` (flash-attention's variable-length kernel runs,
model/attention.py) they carry the sample boundaries too (`cu_seq_lens_q/k`, `max_length_q/k`).
"""

from __future__ import annotations

import numpy as np
import torch

from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.data.render import IGNORE
from lockstep.model.attention import varlen_kwargs


def collate(
    samples: Samples, ids: np.ndarray, pad_id: int, padding_free: bool = False,
    varlen: bool = False,
) -> dict[str, torch.Tensor | int]:  # fmt: skip
    """Right-pad to the longest sample. A PAD slot becomes a one-token row with no targets.

    `labels[i, t]` is the target for position t (the token at t+1), IGNORE where nothing is
    trained, so the loss is a plain sum over positions with no shifting inside the model.
    `varlen`: rows holding several samples also carry their boundaries (see the module).
    """
    if padding_free or samples.position_ids is not None:
        batch = (_collate_padding_free if padding_free else _collate_packed)(samples, ids, pad_id)
        if varlen:
            batch.update(varlen_kwargs(batch["position_ids"].numpy()))
        return batch
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


def _collate_packed(samples: Samples, ids: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: position ids instead of a 2-D attention mask (see data/packing.py).

    Padding after the last sample gets positions 0, 1, ... of its own, so it forms a separate
    sequence that no real token attends to (causal attention looks only backwards).
    """
    width = max((len(samples.input_ids[i]) for i in ids if i != PAD), default=1)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    labels = np.full((len(ids), width), IGNORE, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (len(ids), 1))
    for j, i in enumerate(ids):
        if i == PAD:
            continue
        toks, labs, pos = samples.input_ids[i], samples.labels[i], samples.position_ids[i]
        input_ids[j, : len(toks)] = toks
        labels[j, : len(toks) - 1] = labs[1:]
        positions[j, : len(toks)] = pos
        positions[j, len(toks) :] = np.arange(width - len(toks))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }


def _collate_padding_free(
    samples: Samples, ids: np.ndarray, pad_id: int
) -> dict[str, torch.Tensor]:
    """All samples of the micro-batch in one row, position ids restarting at each sample.

    As with packing (data/packing.py), the restarting position ids keep attention inside each
    sample, so the loss is the padded batch's loss without a single padding token. PAD slots
    add nothing; a micro-batch of PAD slots only is one token with no target.
    """
    real = [i for i in ids if i != PAD]
    if not real:
        zero = torch.zeros((1, 1), dtype=torch.int64)
        return {"input_ids": torch.full_like(zero, pad_id), "labels": torch.full_like(zero, IGNORE),
                "position_ids": zero}  # fmt: skip
    toks = [samples.input_ids[i] for i in real]
    labels = []
    for i, t in zip(real, toks, strict=True):
        lab = np.full(len(t), IGNORE, dtype=np.int64)
        lab[:-1] = samples.labels[i][1:]
        labels.append(lab)
    if samples.position_ids is not None:
        pos = [samples.position_ids[i] for i in real]
    else:
        pos = [np.arange(len(t)) for t in toks]
    return {
        "input_ids": torch.from_numpy(np.concatenate(toks).astype(np.int64))[None],
        "labels": torch.from_numpy(np.concatenate(labels))[None],
        "position_ids": torch.from_numpy(np.concatenate(pos).astype(np.int64))[None],
    }
