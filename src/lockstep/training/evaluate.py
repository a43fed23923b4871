"""Evaluation: token-weighted loss over the whole eval set, on every rank, and its split.

eval_loss = (sum of cross entropy over every target token of the eval set) / (their number),
all-reduced over ranks, so it does not depend on the world size or the micro-batch size;
eval_ppl = exp(eval_loss). Rank r evaluates samples r, r+W, r+2W, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from lockstep.config import DataConfig
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples, check_files
from lockstep.data.order import DATA_STREAM, PAD
from lockstep.data.render import IGNORE
from lockstep.dist import Dist, all_reduce_sum
from lockstep.errors import ConfigError
from lockstep.model.attention import to_device
from lockstep.training.loss import CausalLMLoss

VAL_STREAM = DATA_STREAM + 1


def split_validation(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """(train, validation): the validation samples are drawn by the seed, the same on all ranks."""
    n = len(samples)
    k = max(1, round(n * fraction))
    if k >= n:
        raise ConfigError(f"data.val_fraction={fraction} leaves no training samples of {n}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, VAL_STREAM])))
    val = sorted(rng.permutation(n)[:k].tolist())
    held = set(val)
    train = [i for i in range(n) if i not in held]
    part, held_out = samples.subset(train), samples.subset(val)
    part.stats.held_out = held_out.sample_count()  # said in the start-up log's data line
    return part, held_out


def eval_data(cfg) -> DataConfig | None:
    """The data section that reads data.eval's datasets as its own (None without data.eval),
    every other data setting as the training data's. A missing file is named as data.eval.N."""
    if not cfg.data.eval:
        return None
    data = cfg.data.model_copy(update={"train": cfg.data.eval})
    check_files(data, "data.eval")
    return data


def eval_split(
    cfg, samples: Samples, seed: int, load: Callable[[DataConfig], Samples]
) -> tuple[Samples, Samples | None]:
    """(train samples, eval samples or None) per data.eval / data.val_fraction.

    `load`: how data.eval is read and tokenised (a run: rank 0 builds and caches, the other
    ranks read its cache; `lockstep eval`: in this process).
    """
    if cfg.data.val_fraction:
        return split_validation(samples, cfg.data.val_fraction, seed)
    data = eval_data(cfg)
    return samples, (load(data) if data is not None else None)


@torch.no_grad()
def evaluate(
    engine: torch.nn.Module, samples: Samples, d: Dist, micro_size: int, pad_id: int,
    padding_free: bool = False, precision: AbstractContextManager | None = None,
    varlen: bool = False,
) -> dict:  # fmt: skip
    """`engine`: the loss module (a bare language model is wrapped in one); never DDP's wrapper.
    `padding_free`, `varlen`: the micro-batch layout training uses (data/collate.py).

    Every rank runs the same number of micro-batches (a rank with fewer samples runs empty
    ones): with FSDP each forward gathers weights from all ranks.
    """
    if not isinstance(engine, CausalLMLoss):
        engine = CausalLMLoss(engine)
    was_training = engine.training
    engine.eval()
    mine = np.arange(d.rank, len(samples), d.world_size)
    per_rank = -(-len(samples) // d.world_size)
    ce_sum, targets = 0.0, 0
    for start in range(0, per_rank, micro_size):
        ids = mine[start : start + micro_size]
        if len(ids) == 0:
            ids = np.array([PAD])
        batch = to_device(collate(samples, ids, pad_id, padding_free, varlen), d.device)
        with precision or nullcontext():
            ce_sum += float(engine(batch))
        targets += int((batch["labels"] != IGNORE).sum())
    ce_sum, targets = all_reduce_sum([ce_sum, float(targets)], d)
    if was_training:
        engine.train()
    loss = ce_sum / max(targets, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(targets)}
