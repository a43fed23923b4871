"""Evaluation: the run's objective over the whole eval set, on every rank, and its split.

eval_loss = (the objective's summed loss over the eval set) / (its denominator over the eval
set), all-reduced over ranks, so it does not depend on the world size or the micro-batch size.
Supervised fine-tuning: the cross entropy per target token, with eval_ppl = exp(eval_loss) and
eval_tokens; preference training: the mean loss per pair, with eval_ METRICS (rewards, the share
of pairs whose chosen answer the model finds likelier). Rank r evaluates every W-th unit by
length (rank_share).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from lockstep.config import DataConfig
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples, check_files
from lockstep.data.order import DATA_STREAM, PAD
from lockstep.dist import Dist, all_reduce_sum
from lockstep.errors import ConfigError
from lockstep.model.attention import to_device
from lockstep.training.loss import CausalLMLoss
from lockstep.training.objective import Objective, TokenCrossEntropy
from lockstep.training.preference import PairLoss

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
    every other data setting as the training data's."""
    if not cfg.data.eval:
        return None
    return cfg.data.model_copy(update={"train": cfg.data.eval})


def check_eval_files(cfg) -> None:
    """A missing data.eval file, named as data.eval.N (checked once per process, at start)."""
    data = eval_data(cfg)
    if data is not None:
        check_files(data, "data.eval")


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


def rank_share(lengths: np.ndarray, d: Dist, micro_size: int) -> Iterator[np.ndarray]:
    """The micro-batches of the units rank r takes, `lengths` being every unit's length: the
    units sorted longest first (ties by index), rank r taking the r-th, (r+W)-th, ... of them,
    so that a micro-batch holds units of like lengths (little padding). Every rank gets the
    same number of micro-batches, a rank with fewer units ending on [PAD] ones: with FSDP each
    forward gathers weights from all ranks. What a pass sums over the units does not depend on
    their order, so a pass gives the same result for any world size."""
    units = len(lengths)
    mine = np.argsort(-np.asarray(lengths), kind="stable")[d.rank :: d.world_size]
    for start in range(0, -(-units // d.world_size), micro_size):
        ids = mine[start : start + micro_size]
        yield ids if len(ids) else np.array([PAD])


@torch.no_grad()
def evaluate(
    engine: torch.nn.Module, samples: Samples, d: Dist, micro_size: int, pad_id: int,
    padding_free: bool = False, precision: AbstractContextManager | None = None,
    varlen: bool = False, objective: Objective | None = None,
) -> dict:  # fmt: skip
    """`engine`: the objective's module (a bare language model is wrapped in one); never DDP's
    wrapper. `padding_free`, `varlen`: the micro-batch layout training uses (data/collate.py);
    `objective`: the run's (supervised fine-tuning when None).

    Every rank runs the same number of micro-batches (rank_share).
    """
    objective = objective or TokenCrossEntropy()
    if not isinstance(engine, CausalLMLoss | PairLoss):
        engine = objective.module(engine)
    was_training = engine.training
    engine.eval()
    sums = np.zeros(1 + len(objective.metrics))
    denominator = 0
    for ids in rank_share(objective.unit_lengths(samples), d, micro_size):
        rows = objective.rows(ids)
        batch = collate(samples, rows, pad_id, padding_free, varlen)
        batch = to_device(objective.prepare(ids, batch), d.device)
        with precision or nullcontext():
            sums += engine(batch).reshape(-1).double().cpu().numpy()
        denominator += objective.denominator(samples, ids)
    *totals, denominator = all_reduce_sum([*sums.tolist(), float(denominator)], d)
    if was_training:
        engine.train()
    loss, *metrics = (t / max(denominator, 1) for t in totals)
    if objective.metrics:
        named = {f"eval_{k}": v for k, v in zip(objective.metrics, metrics, strict=True)}
        return {"eval_loss": loss, **named, "eval_units": int(denominator)}
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "eval_tokens": int(denominator),
    }
