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
from lockstep.data.dataset import Samples, build, fingerprint


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
        "stats": np.array(json.dumps(samples.stats)),
    }
    if samples.position_ids is not None:
        arrays["position_ids"] = np.concatenate(samples.position_ids).astype(np.int32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load(path: Path, fp: str) -> Samples:
    with np.load(path) as z:
        cuts = np.cumsum(z["lengths"])[:-1]
        split = lambda name: [a.astype(np.int64) for a in np.split(z[name], cuts)]  # noqa: E731
        positions = split("position_ids") if "position_ids" in z else None
        return Samples(
            split("input_ids"), split("labels"), fp, json.loads(str(z["stats"])), positions
        )


def load_or_build(cfg: DataConfig, tokenizer: Any, write: bool = True) -> tuple[Samples, str]:
    """(samples, what happened: 'cache hit PATH' / 'tokenised, cached in PATH' / 'tokenised')."""
    fp = fingerprint(cfg, tokenizer)
    if not cfg.cache:
        return build(cfg, tokenizer, fp), "tokenised (data.cache off)"
    path = cache_file(cfg, fp)
    if path.is_file():
        try:
            return load(path, fp), f"reusing tokenised data from {path}"
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is rebuilt below
    samples = build(cfg, tokenizer, fp)
    if not write:
        return samples, "tokenised"
    try:
        save(path, samples)
    except OSError as e:
        return samples, f"tokenised (could not write the cache {path}: {e.strerror or e})"
    return samples, f"tokenised, cached in {path}"
