"""The tokenised-data cache: one .npz per data fingerprint, written atomically.

The fingerprint covers file contents, every data setting, the tokenizer and its template, and
lockstep's data version (data/dataset.py), so a cache entry can never be stale: change any of
them and the name changes. Settings that cannot change the samples (num_proc, cache, cache_dir)
are left out of it, so a cache built with 8 processes serves a run with 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lockstep.config import DataConfig
from lockstep.data.dataset import BuildStats, Samples
from lockstep.errors import first_line, reason


def cache_file(cfg: DataConfig, fp: str) -> Path:
    root = (
        Path(cfg.cache_dir).expanduser()
        if cfg.cache_dir
        else Path.home() / ".cache" / "lockstep" / "data"
    )
    return root / f"samples-{fp}.npz"


def save(path: Path, samples: Samples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "lengths": np.array([len(x) for x in samples.input_ids], dtype=np.int64),
        "input_ids": np.concatenate(samples.input_ids).astype(np.int32),
        "labels": np.concatenate(samples.labels).astype(np.int32),
        "stats": np.array(json.dumps(samples.stats.to_json())),
    }
    if samples.dataset is not None:
        arrays["dataset"] = samples.dataset.astype(np.int32)
    if samples.position_ids is not None:
        arrays["position_ids"] = np.concatenate(samples.position_ids).astype(np.int32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load(path: Path, fp: str, datasets: int = 1) -> Samples:
    """The samples of a cache entry; ValueError naming what is wrong with a damaged one, or
    with an entry of several datasets (`datasets`) that does not say each row's (an earlier
    lockstep's: it is tokenised again)."""
    with np.load(path) as z:
        lengths = z["lengths"]
        stats = BuildStats.from_json(json.loads(str(z["stats"])))
        arrays = {name: z[name] for name in ("input_ids", "labels", "position_ids") if name in z}
        source = z["dataset"].astype(np.int64) if "dataset" in z else None
    _check_entry(lengths, arrays)
    if source is None and datasets > 1:
        raise ValueError("it does not say which dataset each sample is from (an older lockstep)")
    if source is not None and (source.shape != lengths.shape or source.max() >= datasets):
        raise ValueError(f"its dataset indices do not fit {len(lengths)} samples of {datasets}")
    cuts = np.cumsum(lengths)[:-1]
    split = {name: [a.astype(np.int64) for a in np.split(v, cuts)] for name, v in arrays.items()}
    positions = split.get("position_ids")
    return Samples(split["input_ids"], split["labels"], fp, stats, positions, source)


def _check_entry(lengths: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """A cache entry whose arrays do not fit together is damaged, not samples to train on."""
    if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu":
        raise ValueError("no sample lengths")
    if (lengths <= 0).any():
        raise ValueError("a sample length is not positive")
    total = int(lengths.sum())
    for name, values in arrays.items():
        if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != total:
            raise ValueError(f"{name} does not hold the {total} tokens of the lengths")
    if "labels" not in arrays or "input_ids" not in arrays:
        raise ValueError("input_ids or labels missing")


def load_or_build(
    cfg: DataConfig, tokenizer: Any, write: bool = True, pairs: bool = False
) -> tuple[Samples, str]:
    """(samples, what happened: 'cache hit PATH' / 'tokenised, cached in PATH' / 'tokenised').
    `pairs`: the datasets hold answer pairs (finetune.stage=preference, data/pairs.py).

    A damaged entry (a truncated or foreign file, arrays that do not fit together, bad stats)
    is said in the answer and tokenised again; rank 0 (write=True) replaces it.
    """
    if pairs:
        from lockstep.data import pairs as pair_data

        build, fingerprint = pair_data.build_pairs, pair_data.fingerprint
    else:
        from lockstep.data.dataset import build, fingerprint
    fp = fingerprint(cfg, tokenizer)
    if not cfg.cache:
        return build(cfg, tokenizer, fp), "tokenised (data.cache off)"
    path = cache_file(cfg, fp)
    damaged = ""
    if path.is_file():
        try:
            return load(path, fp, len(cfg.train)), f"reusing tokenised data from {path}"
        except Exception as e:  # zipfile, numpy, json and OS errors all mean: rebuild it
            damaged = f"the cache entry {path} is damaged ({first_line(e)}): "
    samples = build(cfg, tokenizer, fp)
    if not write:
        return samples, f"{damaged}tokenised"
    try:
        save(path, samples)
    except OSError as e:
        return samples, f"{damaged}tokenised (could not write the cache {path}: {reason(e)})"
    return samples, f"{damaged}tokenised, cached in {path}"
