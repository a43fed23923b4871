"""Load the configured datasets and tokenise them once into (input_ids, labels) samples."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lockstep.config import DataConfig, DatasetConfig
from lockstep.data import formats, sources
from lockstep.data.render import IGNORE, render
from lockstep.errors import DataError

DATA_VERSION = 2  # bump when tokenisation or masking changes


@dataclass
class Samples:
    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)
    position_ids: list[np.ndarray] | None = None  # packed: positions restart at each sample

    def __len__(self) -> int:
        return len(self.input_ids)

    def without_last(self) -> Samples:
        """A copy lacking the last sample, with the fingerprint that content has (testing)."""
        fp = hashlib.sha256(f"{self.fingerprint}|without-last".encode()).hexdigest()[:16]
        positions = self.position_ids[:-1] if self.position_ids is not None else None
        return Samples(self.input_ids[:-1], self.labels[:-1], fp, dict(self.stats), positions)

    def subset(self, indices: list[int], tag: str) -> Samples:
        """Some of the samples (a held-out split), with a fingerprint of its own."""
        fp = hashlib.sha256(f"{self.fingerprint}|{tag}|{len(indices)}".encode()).hexdigest()[:16]
        pos = [self.position_ids[i] for i in indices] if self.position_ids is not None else None
        ids, labels = [self.input_ids[i] for i in indices], [self.labels[i] for i in indices]
        return Samples(ids, labels, fp, dict(self.stats, samples=len(indices)), pos)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    def target_tokens(self, i: int) -> int:
        """Tokens that carry loss for sample i (labels are aligned with inputs, shifted later)."""
        return int((self.labels[i][1:] != IGNORE).sum())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


def check_files(cfg: DataConfig) -> None:
    """Fail fast, before any process or folder is made, on a data path that is not there."""
    for i, ds in enumerate(cfg.train):
        hf = sources.is_saved_dataset(ds.path) or sources.is_hub_name(ds.path)
        if not hf and not sources.files_of(ds.path):
            raise DataError(
                f"data.train.{i}.path: file {ds.path!r} not found "
                f"(looked in {Path(ds.path).resolve()})"
            )


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """What the samples depend on: contents, data settings, tokenizer + template, version."""
    # these cannot change the samples
    exclude = {"num_proc", "cache", "cache_dir", "padding_free", "group_by_length", "num_workers"}
    settings = json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True)
    h = hashlib.sha256(f"v{DATA_VERSION}|{settings}|{tokenizer_fingerprint(tokenizer)}".encode())
    for ds in cfg.train:
        h.update(sources.content_hash(ds.path, ds.split).encode())
    return h.hexdigest()[:16]


def encode(tokenizer: Any, rec: sources.Record, ds: DatasetConfig, cfg: DataConfig):
    """One record -> (input_ids, labels); DataError names the record."""
    conv = formats.convert(rec, ds.format, ds.columns)
    if isinstance(conv, str):  # text: every token is trained, ending with eos
        ids = tokenizer(conv, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return ids, list(ids)
    return render(tokenizer, conv, rec.where, train_on=cfg.train_on, template=cfg.template)


def read_records(cfg: DataConfig) -> list[tuple[int, sources.Record]]:
    """(dataset index, record) for every record used, in the listed order."""
    out = []
    for k, ds in enumerate(cfg.train):
        for n, rec in enumerate(sources.read(ds.path, ds.split)):
            if ds.max_samples is not None and n >= ds.max_samples:
                break
            out.append((k, rec))
    return out


_WORKER: dict[str, Any] = {}  # the tokenizer and config of a forked tokenising process


def _encode_chunk(chunk: list[tuple[int, sources.Record]]) -> list[tuple[list, list] | str]:
    tokenizer, cfg = _WORKER["tokenizer"], _WORKER["cfg"]
    out: list[tuple[list, list] | str] = []
    for k, rec in chunk:
        try:
            out.append(encode(tokenizer, rec, cfg.train[k], cfg))
        except DataError as e:
            out.append(str(e))
    return out


def encode_all(cfg: DataConfig, tokenizer: Any) -> list[tuple[list, list] | str]:
    """Every record encoded (or its error message), in order; data.num_proc processes."""
    records = read_records(cfg)
    _WORKER.update(tokenizer=tokenizer, cfg=cfg)
    size = max(1, min(2000, len(records) // (cfg.num_proc * 4) or 1))
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    bar = tqdm(total=len(records), desc="tokenise", unit="rec", disable=len(records) < 20_000,
               mininterval=1.0)  # fmt: skip
    results: list[tuple[list, list] | str] = []
    try:
        if cfg.num_proc > 1 and len(chunks) > 1:
            ctx = multiprocessing.get_context("fork")  # workers inherit the tokenizer
            with ctx.Pool(cfg.num_proc) as pool:
                for part in pool.imap(_encode_chunk, chunks):
                    results.extend(part)
                    bar.update(len(part))
        else:
            for chunk in chunks:
                results.extend(_encode_chunk(chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
        _WORKER.clear()
    return results


def build(cfg: DataConfig, tokenizer: Any, fp: str | None = None) -> Samples:
    """Tokenise every record; apply the bad-record, overlong and packing policies."""
    check_files(cfg)
    fp = fp or fingerprint(cfg, tokenizer)
    ids_list: list[np.ndarray] = []
    labels_list: list[np.ndarray] = []
    bad: list[str] = []
    truncated = dropped = 0
    for result in encode_all(cfg, tokenizer):
        if isinstance(result, str):
            if cfg.on_bad_record == "error":
                raise DataError(f"{result} (data.on_bad_record=skip skips such records)")
            bad.append(result)
            continue
        ids, labels = result
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                dropped += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            truncated += 1
        ids_list.append(np.asarray(ids, dtype=np.int64))
        labels_list.append(np.asarray(labels, dtype=np.int64))
    if not ids_list:
        files = ", ".join(ds.path for ds in cfg.train)
        why = f" ({len(bad)} bad records skipped, {dropped} too long)" if bad or dropped else ""
        raise DataError(f"data.train holds no usable records{why}: {files}")
    lengths = np.array([len(x) for x in ids_list])
    stats = {
        "samples": len(ids_list),
        "tokens": int(lengths.sum()),
        "target_tokens": int(sum(int((lab != IGNORE).sum()) for lab in labels_list)),
        "truncated": truncated,
        "dropped": dropped,
        "skipped": len(bad),
        "first_skipped": bad[:3],
        "max_len": int(lengths.max()),
    }
    samples = Samples(ids_list, labels_list, fp, stats)
    if cfg.packing:
        from lockstep.data.packing import pack

        samples = pack(samples, cfg.max_length)
    return samples
