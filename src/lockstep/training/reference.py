"""preference.reference=precompute: the starting model's log-probability of every answer,
computed once before training and read back afterwards.

The table holds one float per row of the pairs' samples (row 2i: pair i's chosen answer, 2i+1:
its rejected one). It is computed by every rank together (each rank takes every W-th pair by
length: evaluate.rank_share; the shares are summed across ranks), through the trainee as it will train (its precision, its
sharding) in eval mode, before any checkpoint is loaded into it. Rank 0 writes it next to the
tokenised data as `reference-FINGERPRINT-KEY.npy`, KEY covering the starting weights (all of
them, frozen ones included), the dtype and the kernel; a second run or a resume on the same data
and starting model reads it back instead of computing it. The cross-rank fingerprint check
covers the table's hash.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from lockstep.config import RunConfig
from lockstep.data import cache
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.dist import Dist, all_reduce_sum, check_lockstep, main_first
from lockstep.model.attention import to_device
from lockstep.training import parallel
from lockstep.training.evaluate import rank_share
from lockstep.training.preference import REFERENCE_PASS, PairPreference
from lockstep.training.state import Layout


def table_path(cfg: RunConfig, samples: Samples, starting_weights: str, kernel: str) -> Path:
    """Where the table of these samples under this starting model is cached."""
    key = f"{starting_weights}|{cfg.model.dtype}|{cfg.model.master_weights}|{kernel}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    entry = cache.cache_file(cfg.data, samples.fingerprint)
    return entry.with_name(f"reference-{samples.fingerprint}-{digest}.npy")


def table_hash(table: np.ndarray | None) -> str:
    if table is None:
        return "none"
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float64).tobytes()).hexdigest()[:16]


def precomputed(
    cfg: RunConfig, d: Dist, trainee: torch.nn.Module, objective: PairPreference,
    samples: Samples, pad_id: int, path: Path, layout: Layout,
) -> tuple[np.ndarray, str]:  # fmt: skip
    """(the table, what happened: read from PATH / computed in S s, cached in PATH). `layout`:
    the micro-batch layout training uses (padding-free rows or not), the pass's too.

    The ranks first compare what the table depends on (the data's fingerprint, its rows, the
    starting weights, dtype and kernel: PATH's name), so that ranks out of lockstep stop with
    the fingerprint table before the collective pass, not inside it."""
    fields = {"reference_table": path.name, "reference_rows": str(len(samples))}
    check_lockstep(fields, d, "before the reference pass")
    table = read(path, len(samples))
    # every rank read it, or every rank computes it (the pass is collective)
    if all_reduce_sum([float(table is not None)], d)[0] == d.world_size:
        return table, f"read from {path}"
    started = time.perf_counter()
    table = compute(cfg, d, trainee, objective, samples, pad_id, layout)
    took = time.perf_counter() - started
    with main_first(d, "writes the reference log-probabilities"):
        if d.is_main and cfg.data.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as f:
                np.save(f, table)
            tmp.replace(path)
    return table, f"computed in {took:.1f}s" + (f", cached in {path}" if cfg.data.cache else "")


def read(path: Path, rows: int) -> np.ndarray | None:
    """The cached table, or None when it is missing, damaged or not one of `rows` rows."""
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = table.shape == (rows,) and table.dtype == np.float64 and np.isfinite(table).all()
    return table if ok else None


@torch.no_grad()
def compute(
    cfg: RunConfig, d: Dist, trainee: torch.nn.Module, objective: PairPreference,
    samples: Samples, pad_id: int, layout: Layout,
) -> np.ndarray:  # fmt: skip
    """Every row's log-probability under the trainee's model as it is now (all ranks take part,
    each running the same number of micro-batches, pairs of like lengths together:
    evaluate.rank_share)."""
    table = torch.zeros(len(samples), dtype=torch.float64, device=d.device)
    was = trainee.training
    trainee.eval()
    try:
        for ids in rank_share(objective.unit_lengths(samples), d, cfg.batch.micro_size):
            rows = objective.rows(ids)
            batch = collate(samples, rows, pad_id, layout.padding_free, layout.attention.varlen)
            batch = {**objective.prepare(ids, batch), REFERENCE_PASS: torch.ones(())}
            with parallel.autocast(cfg, d):
                logps = trainee(to_device(batch, d.device)).double()
            if layout.padding_free:  # the answers end to end, PAD slots left out
                rows = rows[rows != PAD]
                logps = logps[: len(rows)]
            real = torch.from_numpy(rows != PAD).to(d.device)
            at = torch.from_numpy(np.where(rows == PAD, 0, rows)).to(d.device)
            table.index_add_(0, at[real], logps[real])
    finally:
        trainee.train(was)
        if hasattr(trainee, "reshard"):  # FSDP2: the root unit stays gathered after a forward
            trainee.reshard()
    if d.distributed:
        tdist.all_reduce(table)
    return table.cpu().numpy()
