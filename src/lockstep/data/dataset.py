"""Load the configured datasets and tokenise them once into (input_ids, labels) samples.

A record becomes one sample, or several: a conversation whose template rewrites earlier turns
is split by data.multi_turn=auto (data/render.py), a text document longer than max_length is
cut into consecutive chunks that overlap by one token, so every token of it is trained exactly
once. What the build did beyond one-record-one-sample is counted in `stats["notes"]` and said in
the start-up log and `lockstep data preview` (`describe`), as are the fields nothing read.
"""

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
from lockstep.data import formats, sources, templates
from lockstep.data.render import IGNORE, Options, Renderer
from lockstep.errors import ConfigError, DataError, DatasetError

DATA_VERSION = 3  # bump when tokenisation or masking changes

# What each note means, said once in the start-up log and in `data preview` with the number of
# records (or samples) it concerns and the first of them; rendering (render.py) notes a record
# once per kind, the build adds its own.
NOTES = {
    "split": "records became several samples (data.multi_turn={multi_turn}: with auto, because "
    "the template writes an earlier turn differently once the conversation goes on)",
    "prompt_tail": "records trained without the end of the generation prompt: the template "
    "never writes it into a conversation",
    "eos_appended": "records whose last trained turn got the tokenizer's eos token appended and "
    "trained: the template writes no end-of-turn marker",
    "no_end_marker": "records with an assistant turn that has no end-of-turn marker trained: the "
    "template writes none and another turn follows (data.multi_turn=split ends each turn with "
    "the eos token)",
    "system_dropped": "records whose system message is not in the template's rendering (it drops "
    "or replaces it)",
    "message_dropped": "records with a user or tool message the template's rendering leaves out",
    "tools_dropped": "records whose tool definitions are not in the template's rendering (it does "
    "not read `tools`)",
    "reasoning_dropped": "records whose reasoning was removed (data.reasoning=drop)",
    "system_moved": "records trained with the system prompt inside the last user turn, where this "
    "template writes it when the model is prompted (a finished conversation has none)",
    "trailing": "records ending with messages after the last trained turn: they train nothing and "
    "are left out of the samples",
    "unprobed": "records rendered with a template that refused lockstep's probe conversation (a "
    "user turn and an answer), so an end-of-conversation token or a generation-prompt tail is "
    "not known to it (trained as written)",
    "dated": "records rendered with today's date (the template calls strftime_now): the "
    "samples depend on the day they are tokenised; the data cache keeps them for resumes",
    "no_target": "samples dropped: truncation to data.max_length left no trained token",
    "chunked": "extra samples from text documents longer than data.max_length, cut into "
    "consecutive chunks (every token trained once)",
    "split_markers": "records rendered by data.template={template}, whose markers this tokenizer "
    "has no single token for (each is trained as several plain-text tokens): use "
    "data.template=plain (it ends turns with the tokenizer's eos), or give data.chat_template a "
    "template written with this tokenizer's special tokens",
}
WARNINGS = {"prompt_tail", "eos_appended", "no_end_marker", "system_dropped", "message_dropped",
            "tools_dropped", "unprobed", "no_target", "split_markers"}  # fmt: skip


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

    def subset(self, indices: list[int]) -> Samples:
        """Some of the samples (a held-out split), with stats counting only them.

        The fingerprint stays the data's (the one its cache file is named by): which samples a
        split takes follows from the data, the seed and the split's settings, all checked.
        Counts of the build (records, truncated, skipped, notes) stay those of all the data.
        """
        pos = [self.position_ids[i] for i in indices] if self.position_ids is not None else None
        ids, labels = [self.input_ids[i] for i in indices], [self.labels[i] for i in indices]
        stats = dict(
            self.stats,
            samples=len(indices),
            tokens=sum(len(x) for x in ids),
            target_tokens=sum(int((lab != IGNORE).sum()) for lab in labels),
            max_len=max((len(x) for x in ids), default=0),
        )
        if pos is not None:  # packed: each row holds several samples, each starting at 0
            stats.update(samples=sum(int((p == 0).sum()) for p in pos), packs=len(indices))
        return Samples(ids, labels, self.fingerprint, stats, pos)

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


def check_files(cfg: DataConfig, section: str = "data.train") -> None:
    """Fail fast, before any process or folder is made, on a data path that is not there, a
    text file given a chat format, or a data.chat_template file that is missing."""
    for i, ds in enumerate(cfg.train):
        try:
            path = sources.local(ds.path)
        except DataError as e:
            raise DataError(f"{section}.{i}.path: {e}") from None
        hf = sources.is_saved_dataset(path) or sources.is_hub_name(path)
        files = [] if hf else sources.files_of(path)
        if not hf and not files:
            raise DataError(
                f"{section}.{i}.path: file {ds.path!r} not found (looked in {Path(path).resolve()})"
            )
        text = [f for f in files if f.suffix.lower() == ".txt"]
        if text and ds.format != "text":
            raise ConfigError(
                f"{section}.{i}: {text[0]} is plain text, read as one document: set "
                f"format: text for this dataset (it has format: {ds.format})"
            )
    templates.configured(cfg)


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """What the samples depend on: contents, data settings, tokenizer + template, version."""
    # these cannot change the samples
    exclude = {"num_proc", "cache", "cache_dir", "padding_free", "group_by_length", "num_workers"}
    settings = json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True)
    h = hashlib.sha256(f"v{DATA_VERSION}|{settings}|{tokenizer_fingerprint(tokenizer)}".encode())
    for ds in cfg.train:
        h.update(sources.content_hash(ds.path, ds.split).encode())
    return h.hexdigest()[:16]


@dataclass
class Encoded:
    """One record, tokenised: its samples, what rendering noted, and its unread fields."""

    samples: list[tuple[list[int], list[int]]]
    notes: list[tuple[str, str]]
    unused: tuple[str, ...] = ()
    chunks: int = 1  # a text document's chunks (1: it fits max_length)


def encode(renderer: Renderer, rec: sources.Record, ds: DatasetConfig, cfg: DataConfig) -> Encoded:
    """One record -> its samples; DataError names the record."""
    conv = formats.convert(rec, ds.format, ds.columns, ds.ignore_fields)
    if isinstance(conv, formats.Document):  # every token trained, ending with eos
        tok = renderer.tok
        ids = tok(conv.text, add_special_tokens=True, verbose=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids = [*ids, tok.eos_token_id]
        parts = chunks(ids, cfg.max_length)
        return Encoded([(p, list(p)) for p in parts], [], conv.unused, len(parts))
    rendered = renderer.render(conv, rec.where)
    return Encoded(rendered.samples, rendered.notes, conv.unused)


def chunks(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive windows of `length` tokens, each starting on the last token of the one
    before: a token is only a target with context before it, so this trains every token but
    the first exactly once."""
    if len(ids) <= length:
        return [ids]
    step = length - 1
    return [ids[k : k + length] for k in range(0, len(ids) - 1, step)]


def read_records(cfg: DataConfig) -> list[tuple[int, sources.Record]]:
    """(dataset index, record) for every record used, in the listed order."""
    out = []
    for k, ds in enumerate(cfg.train):
        for n, rec in enumerate(sources.read(ds.path, ds.split)):
            if ds.max_samples is not None and n >= ds.max_samples:
                break
            out.append((k, rec))
    return out


_WORKER: dict[str, Any] = {}  # the renderer and config of a forked tokenising process


def _encode_chunk(chunk: list[tuple[int, sources.Record]]) -> list[Encoded | str]:
    renderer, cfg = _WORKER["renderer"], _WORKER["cfg"]
    out: list[Encoded | str] = []
    for k, rec in chunk:
        try:
            out.append(encode(renderer, rec, cfg.train[k], cfg))
        except DatasetError:
            raise  # a dataset-wide problem: skipping records would hide it
        except DataError as e:
            out.append(str(e))
    return out


def encode_all(
    cfg: DataConfig, tokenizer: Any
) -> tuple[list[tuple[int, sources.Record]], list[Encoded | str]]:
    """Every record and its encoding (or its error message), in order; data.num_proc processes."""
    records = read_records(cfg)
    _WORKER.update(renderer=Renderer(tokenizer, Options.of(cfg)), cfg=cfg)
    size = max(1, min(2000, len(records) // (cfg.num_proc * 4) or 1))
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    bar = tqdm(total=len(records), desc="tokenise", unit="rec", disable=len(records) < 20_000,
               mininterval=1.0)  # fmt: skip
    results: list[Encoded | str] = []
    try:
        if cfg.num_proc > 1 and len(batches) > 1:
            ctx = multiprocessing.get_context("fork")  # workers inherit the tokenizer
            with ctx.Pool(cfg.num_proc) as pool:
                for part in pool.imap(_encode_chunk, batches):
                    results.extend(part)
                    bar.update(len(part))
        else:
            for batch in batches:
                results.extend(_encode_chunk(batch))
                bar.update(len(batch))
    finally:
        bar.close()
        _WORKER.clear()
    return records, results


class _Tally:
    """Counts what a build did, for `stats` (plain JSON: it is cached with the samples)."""

    def __init__(self) -> None:
        self.notes: dict[str, dict[str, Any]] = {}
        self.unused: dict[str, dict[str, int]] = {}

    def note(self, kind: str, where: str, detail: str, n: int = 1) -> None:
        entry = self.notes.setdefault(kind, {"count": 0, "first": where, "detail": detail})
        entry["count"] += n

    def fields(self, dataset: int, names: tuple[str, ...]) -> None:
        counts = self.unused.setdefault(str(dataset), {})
        for name in names:
            counts[name] = counts.get(name, 0) + 1


def build(cfg: DataConfig, tokenizer: Any, fp: str | None = None) -> Samples:
    """Tokenise every record; apply the bad-record, overlong and packing policies."""
    check_files(cfg)
    fp = fp or fingerprint(cfg, tokenizer)
    ids_list: list[np.ndarray] = []
    labels_list: list[np.ndarray] = []
    bad: list[str] = []
    truncated = dropped = 0
    tally = _Tally()
    records, results = encode_all(cfg, tokenizer)
    for (k, rec), result in zip(records, results, strict=True):
        if isinstance(result, str):
            if cfg.on_bad_record == "error":
                raise DataError(f"{result} (data.on_bad_record=skip skips such records)")
            bad.append(result)
            continue
        for kind, detail in result.notes:
            tally.note(kind, rec.where, detail)
        if result.chunks > 1:
            tally.note("chunked", rec.where, f"{result.chunks} chunks", result.chunks - 1)
        tally.fields(k, result.unused)
        for ids, labels in result.samples:
            if len(ids) > cfg.max_length:
                if cfg.overlong == "drop":
                    dropped += 1
                    continue
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
                truncated += 1
            label_arr = np.asarray(labels, dtype=np.int64)
            if not (label_arr[1:] != IGNORE).any():
                tally.note("no_target", rec.where, f"{len(ids)} tokens kept")
                continue
            ids_list.append(np.asarray(ids, dtype=np.int64))
            labels_list.append(label_arr)
    split = templates.split_markers(tokenizer, cfg.template)
    if split:
        tally.note("split_markers", "", ", ".join(split), len(records) - len(bad))
    if not ids_list:
        files = ", ".join(ds.path for ds in cfg.train)
        why = [f"{len(bad)} bad records skipped"] if bad else []
        why += [f"{dropped} too long"] if dropped else []
        if "no_target" in tally.notes:
            why.append(f"{tally.notes['no_target']['count']} left with no trained token")
        raise DataError(
            f"data.train holds no usable records{' (' + ', '.join(why) + ')' if why else ''}: "
            f"{files}"
        )
    lengths = np.array([len(x) for x in ids_list])
    stats = {
        "records": len(records) - len(bad),
        "samples": len(ids_list),
        "tokens": int(lengths.sum()),
        "target_tokens": int(sum(int((lab != IGNORE).sum()) for lab in labels_list)),
        "truncated": truncated,
        "dropped": dropped,
        "skipped": len(bad),
        "first_skipped": bad[:3],
        "max_len": int(lengths.max()),
        "notes": tally.notes,
        "unused": tally.unused,
    }
    samples = Samples(ids_list, labels_list, fp, stats)
    if cfg.packing:
        from lockstep.data.packing import pack

        samples = pack(samples, cfg.max_length)
    return samples


def describe(stats: dict[str, Any], cfg: DataConfig) -> list[tuple[bool, str]]:
    """(is a warning, line) for each note of a build and each dataset's unread fields."""
    lines = []
    for kind, n in stats.get("notes", {}).items():
        text = NOTES[kind].format(multi_turn=cfg.multi_turn, template=cfg.template)
        where = "; first: " + n["first"] if n["first"] else ""
        detail = f" ({n['detail']})" if n["detail"] else ""
        lines.append((kind in WARNINGS, f"{n['count']} {text}{where}{detail}"))
    for k, counts in stats.get("unused", {}).items():
        if counts:
            path = cfg.train[int(k)].path if int(k) < len(cfg.train) else f"dataset {k}"
            listed = ", ".join(f"{name} ({n} records)" for name, n in sorted(counts.items()))
            lines.append(
                (False, f"{path}: fields not used: {listed} (ignore_fields silences this)")
            )
    return lines
