"""What a step minimises: the one component of the loop that knows the loss.

An objective gives the loop three things, and the loop knows nothing else of the loss:

- `module(model)`: the module DDP or FSDP wraps; it takes a micro-batch (on its device) and
  returns the micro-batch's *summed* loss, a scalar tensor;
- `prepare(batch)`: what the micro-batch needs beyond collation, computed on the host before it
  moves to its device;
- `denominator(samples, ids)`: what the summed losses of a step are divided by, counted over
  the step's whole global batch `ids` (every rank counts the same number, with no
  communication), so the step's loss does not depend on the world size or the accumulation.

`objective(cfg)` picks the objective of a run. Today: supervised fine-tuning, the token-normalised
cross entropy of training/loss.py.
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

    def module(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def prepare(self, batch: Batch) -> Batch: ...

    def denominator(self, samples: Samples, ids: np.ndarray) -> int: ...


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Supervised fine-tuning: the summed cross entropy of the target tokens over their number
    in the global batch (training/loss.py). `chunk`: train.loss_chunk."""

    chunk: int | None = 1024
    name: str = "sft"

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return CausalLMLoss(model, self.chunk)

    def prepare(self, batch: Batch) -> Batch:
        return with_target_index(batch)

    def denominator(self, samples: Samples, ids: np.ndarray) -> int:
        return sum(samples.target_tokens(int(i)) for i in ids if i != PAD)


def objective(cfg: RunConfig) -> Objective:
    """The objective a run trains with."""
    return TokenCrossEntropy(cfg.train.loss_chunk)
