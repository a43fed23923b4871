"""Token-normalised cross entropy: the one place that defines what "the loss" is.

The loss of an optimizer step is

    L = (sum of per-token cross entropy over every target token of the global batch)
        / (number of target tokens in the global batch, all-reduced over ranks)

Each micro-batch contributes `sum_ce * world_size / global_targets` to backward(): DDP averages
gradients over ranks (divides by world_size), so the accumulated gradient is exactly dL/dθ,
whatever the world size W and accumulation A. A per-micro-batch mean (what many trainers do)
weights a token in a short micro-batch more than one in a long micro-batch, so its gradient
changes with W and A; this one does not, up to floating-point summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lockstep.data.render import IGNORE


def cross_entropy_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross entropy over the target positions of a micro-batch (labels pre-shifted)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False also matters for packing: with a cache, transformers skips deriving the
    # block-diagonal mask from restarting position ids (see data/packing.py)
    out = model(**inputs, use_cache=False)
    logits = out.logits.float()
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)),
        batch["labels"].view(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def backward_scale(world_size: int, global_targets: int) -> float:
    """Factor for a micro-batch's summed loss so that accumulated DDP gradients equal dL/dθ."""
    return world_size / max(global_targets, 1)
