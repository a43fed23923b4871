"""The micro-batches of this rank, step after step, built ahead by worker processes if asked.

Item k of the run is micro-batch a = k % A of step start + k // A, exactly as the order function
says: workers only collate (ids -> tensors), so the data order never depends on their number.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lockstep.data.collate import collate
from lockstep.data.dataset import Samples
from lockstep.data.order import Order


class StepMicroBatches(Dataset):
    """Item k: (the order's ids of micro-batch k, the collated rows of those ids). `rows` maps
    the order's ids to the samples a micro-batch holds (training/objective.py: a pair is two
    rows); None: one sample each."""

    def __init__(
        self, samples: Samples, order: Order, rank: int, start_step: int, steps: int,
        pad_id: int, padding_free: bool, varlen: bool = False,
        rows: Callable[[np.ndarray], np.ndarray] | None = None,
    ):  # fmt: skip
        self.samples, self.order, self.rank = samples, order, rank
        self.start_step, self.steps = start_step, steps
        self.pad_id, self.padding_free, self.varlen = pad_id, padding_free, varlen
        self.rows = rows

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.order.accumulation

    def __getitem__(self, k: int) -> tuple[np.ndarray, dict[str, torch.Tensor | int]]:
        step, a = divmod(k, self.order.accumulation)
        ids = self.order.micro_batches(self.start_step + step, self.rank)[a]
        rows = self.rows(ids) if self.rows else ids
        return ids, collate(self.samples, rows, self.pad_id, self.padding_free, self.varlen)


def micro_batches(
    samples: Samples, order: Order, rank: int, start_step: int, steps: int, pad_id: int,
    padding_free: bool, num_workers: int, pin_memory: bool, varlen: bool = False,
    rows: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor | int]]]:  # fmt: skip
    """Every micro-batch of this rank from `start_step` to `steps`, in training order.

    `varlen`: batches carry the sample boundaries of their rows (data/collate.py); `rows`: see
    StepMicroBatches."""
    data = StepMicroBatches(
        samples, order, rank, start_step, steps, pad_id, padding_free, varlen, rows
    )
    if num_workers == 0:
        return (data[k] for k in range(len(data)))
    loader = DataLoader(
        data, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4, collate_fn=_keep, worker_init_fn=_leave_signals_to_the_main_process,
    )  # fmt: skip
    return iter(loader)


def _keep(item):
    return item


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT: torchrun, a scheduler or the terminal sends them
    to every process of the run, and the main process handles them (it finishes the step and
    saves a checkpoint, training/preempt.py) while its workers go on serving it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
