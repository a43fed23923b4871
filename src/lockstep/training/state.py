"""What one training run holds, declared up front: `Run` is built once (training/build.py),
trained (training/loop.py) and finished (training/final.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from lockstep import config as config_mod
from lockstep.config import RunConfig
from lockstep.data.dataset import Samples
from lockstep.data.order import Order, batch_sha
from lockstep.dist import Dist
from lockstep.model.attention import Choice
from lockstep.report.metrics import MetricsWriter
from lockstep.training.checkpoint import Loaded, Saver
from lockstep.training.objective import Objective
from lockstep.training.options import RunOptions
from lockstep.training.profile import Profile

MicroBatch = tuple[np.ndarray, dict[str, Any]]  # (sample ids, collated tensors)


@dataclass(frozen=True)
class Layout:
    """How samples are laid into the rows of a micro-batch, and the attention kernel that keeps
    them apart (model/attention.py)."""

    padding_free: bool  # samples end to end in one row, no padding (data.padding_free)
    packed: bool  # samples packed into sequences of data.max_length when tokenised
    attention: Choice

    @property
    def shared_rows(self) -> bool:
        """Several samples in one row: padding-free rows or packed sequences."""
        return self.padding_free or self.packed


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as the logs and the progress bar show it."""

    done: int  # steps done, counting this one (the logs count from 1)
    loss: float  # the objective's loss of the whole global batch
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    tokens: int  # tokens of the global batch (padding excluded)
    target_tokens: int  # tokens of the global batch that carry loss
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own (objective.py)


@dataclass
class LogWindow:
    """The steps since the last logged one. A logged row averages their losses; a checkpoint
    keeps the losses, so a resumed run logs the same rows as one that was never stopped."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.losses.append(result.loss)
        self.tokens += result.tokens

    def close(self) -> tuple[float, float]:
        """(mean loss, tokens per second) of the window; a new window starts now."""
        now = time.perf_counter()
        mean = sum(self.losses) / len(self.losses)
        rate = self.tokens / max(now - self.started, 1e-9)
        self.losses, self.tokens, self.started = [], 0, now
        return mean, rate


@dataclass
class Run:
    """Everything a run trains with, in the order it is built."""

    cfg: RunConfig  # with the seed every rank agreed on
    d: Dist
    opts: RunOptions
    resumed: Loaded | None  # the checkpoint this run continues, if any
    data_rank: int  # whose micro-batches this process trains on: its rank, or --as-rank's
    data_world: int
    tokenizer: Any
    samples: Samples
    eval_samples: Samples | None
    order: Order
    steps: int  # the run's last step
    start_step: int  # steps done before this process started (a resume)
    layout: Layout
    objective: Objective
    model: torch.nn.Module  # the language model, adapters applied (FSDP: this rank's shards)
    trainee: torch.nn.Module  # the objective's module around `model`, under DDP or FSDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[MicroBatch]  # this rank's micro-batches from start_step on
    saver: Saver | None  # None for a replay (--as-rank): it writes no checkpoint
    metrics: MetricsWriter
    ids_log: IO[str] | None  # log.sample_ids: which samples each micro-batch held
    bar: tqdm
    window: LogWindow
    profile: Profile  # log.profile's profiler (idle outside its steps)
    started: float = field(default_factory=time.perf_counter)  # perf_counter() when built
    adapter_sha: str = ""  # adapters.init_from_digest of finetune.lora.init_from ("" without)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def replay(self) -> bool:
        return self.opts.as_rank is not None

    def close(self, status: str = "finished") -> None:
        """Close the outputs; the trackers' runs end as `status` (finished, failed, stopped)."""
        self.bar.close()
        self.profile.close()
        self.metrics.close(status)
        if self.ids_log:
            self.ids_log.close()


def fingerprint_fields(
    cfg: RunConfig, samples: Samples, order: Order, weights: str, step: int = 0,
    objective: Objective | None = None, adapter_sha: str = "",
) -> dict[str, str]:  # fmt: skip
    """What every rank must agree on before (and while) training together (dist.check_lockstep);
    `weights`: the params_checksum of this rank's trainable weights; `objective`'s precomputed
    reference log-probabilities, if it has them; `adapter_sha`: the digest of the
    finetune.lora.init_from adapter each rank read."""
    import transformers

    from lockstep import __version__
    from lockstep.training.reference import table_hash

    return {
        "lockstep": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # the config less what may differ between ranks (launch, testing): config_hash is all
        "shared_config_hash": config_mod.config_hash(cfg, exclude=("launch", "testing")),
        "seed": str(cfg.seed),
        "data_fingerprint": samples.fingerprint,
        "num_samples": str(len(samples)),
        "next_batch_sha": batch_sha(order.global_batch(step)),
        "params_checksum": weights,
        "reference_table": table_hash(getattr(objective, "table", None)),
        "init_from_adapter": adapter_sha or "none",
    }
