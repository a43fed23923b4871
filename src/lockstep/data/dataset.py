"""Load the configured datasets and tokenise them once into (input_ids, labels) samples."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lockstep.config import DataConfig
from lockstep.data.formats import read_records, to_messages
from lockstep.data.render import IGNORE, render
from lockstep.errors import DataError

DATA_VERSION = 1  # bump when tokenisation or masking changes


@dataclass
class Samples:
    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    fingerprint: str
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def without_last(self) -> Samples:
        """A copy lacking the last sample, with the fingerprint that content has (testing)."""
        fp = hashlib.sha256(f"{self.fingerprint}|without-last".encode()).hexdigest()[:16]
        return Samples(self.input_ids[:-1], self.labels[:-1], fp, dict(self.stats))

    def target_tokens(self, i: int) -> int:
        """Tokens that carry loss for sample i (labels are aligned with inputs, shifted later)."""
        return int((self.labels[i][1:] != IGNORE).sum())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(
        tokenizer.backend_tokenizer.to_str().encode()
        if hasattr(tokenizer, "backend_tokenizer")
        else b""
    )
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


def check_files(cfg: DataConfig) -> None:
    """Fail fast, before any process or folder is made, on a data file that is not there."""
    for i, ds in enumerate(cfg.train):
        p = Path(ds.path)
        if not p.is_file():
            hint = " (it is a folder)" if p.is_dir() else ""
            raise DataError(
                f"data.train.{i}.path: file {ds.path!r} not found{hint} (looked in {p.resolve()})"
            )


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """What the samples depend on: file contents, formats, tokenizer + template, max_length."""
    h = hashlib.sha256(
        f"v{DATA_VERSION}|{cfg.max_length}|{tokenizer_fingerprint(tokenizer)}".encode()
    )
    for ds in cfg.train:
        h.update(f"|{ds.format}|".encode())
        with Path(ds.path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def build(cfg: DataConfig, tokenizer: Any) -> Samples:
    check_files(cfg)
    fp = fingerprint(cfg, tokenizer)
    ids_list: list[np.ndarray] = []
    labels_list: list[np.ndarray] = []
    truncated = 0
    for ds in cfg.train:
        for rec in read_records(ds.path):
            ids, labels = render(tokenizer, to_messages(rec, ds.format), rec.where)
            if len(ids) > cfg.max_length:
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
                truncated += 1
            ids_list.append(np.asarray(ids, dtype=np.int64))
            labels_list.append(np.asarray(labels, dtype=np.int64))
    if not ids_list:
        files = ", ".join(ds.path for ds in cfg.train)
        raise DataError(f"data.train holds no records ({files})")
    lengths = np.array([len(x) for x in ids_list])
    stats = {
        "samples": len(ids_list),
        "tokens": int(lengths.sum()),
        "target_tokens": int(sum(int((lab != IGNORE).sum()) for lab in labels_list)),
        "truncated": truncated,
        "max_len": int(lengths.max()),
    }
    return Samples(ids_list, labels_list, fp, stats)
