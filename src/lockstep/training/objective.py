"""What a step minimises: the one component of the loop that knows the loss.

An objective gives the loop these things, and the loop knows nothing else of the loss:

- `units(samples)`, `unit_lengths(samples)`: what the data order deals out (data/order.py): a
  sample, or a pair of samples; `rows(ids)`: the samples (rows) of the units `ids`, in the
  order a micro-batch holds them;

- `module(model)`: the module DDP or FSDP wraps; it takes a micro-batch (on its device) and
  returns the micro-batch's *summed* loss, a scalar tensor, or a vector: the summed loss, then
  the sums of the objective's `metrics` (logged divided by the same denominator);
- `prepare(ids, batch)`: what the micro-batch of units `ids` needs beyond collation, computed
  on the host before it moves to its device;
- `denominator(samples, ids)`: what the summed losses of a step are divided by, counted over
  the step's whole global batch `ids` (every rank counts the same number, with no
  communication), so the step's loss does not depend on the world size or the accumulation.

`objective(cfg)` picks the objective of a run: supervised fine-tuning (the token-normalised cross
entropy of training/loss.py), or preference training (training/preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lockstep.config import RunConfig
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.training.loss import CausalLMLoss, with_target_index

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    name: str
    metrics: tuple[str, ...]  # what the module's vector holds after the loss

    def module(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def units(self, samples: Samples) -> int: ...

    def unit_lengths(self, samples: Samples) -> np.ndarray: ...

    def rows(self, ids: np.ndarray) -> np.ndarray: ...

    def prepare(self, ids: np.ndarray, batch: Batch) -> Batch: ...

    def denominator(self, samples: Samples, ids: np.ndarray) -> int: ...


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Supervised fine-tuning: the summed cross entropy of the target tokens over their number
    in the global batch (training/loss.py). `chunk`: train.loss_chunk."""

    chunk: int | None = 1024
    name: str = "sft"
    metrics: tuple[str, ...] = ()

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return CausalLMLoss(model, self.chunk)

    def units(self, samples: Samples) -> int:
        return len(samples)

    def unit_lengths(self, samples: Samples) -> np.ndarray:
        return samples.lengths()

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return ids

    def prepare(self, ids: np.ndarray, batch: Batch) -> Batch:
        return with_target_index(batch)

    def denominator(self, samples: Samples, ids: np.ndarray) -> int:
        return sum(samples.target_tokens(int(i)) for i in ids if i != PAD)


def objective(cfg: RunConfig) -> Objective:
    """The objective a run trains with."""
    if cfg.finetune.stage == "preference":
        from lockstep.training import preference

        p = cfg.preference
        settings = preference.Settings(p.loss, p.beta, p.label_smoothing, p.gamma, p.orpo_lambda)
        return preference.PairPreference(
            settings, preference.reference_of(cfg), cfg.train.loss_chunk
        )
    return TokenCrossEntropy(cfg.train.loss_chunk)
