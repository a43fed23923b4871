"""Load the configured datasets and tokenise them once into (input_ids, labels) samples.

A record becomes one sample, or several: a conversation whose template rewrites earlier turns
is split by data.multi_turn=auto (data/render.py), a text document longer than max_length is
cut into consecutive chunks that overlap by one token, so every token of it is trained exactly
once. What the build did beyond one-record-one-sample is counted in `stats.notes` and said in
the start-up log and `lockstep data preview` (`describe`), as are the fields nothing read.

Records are tokenised in data.num_proc forked processes when it is above 1: each inherits the
renderer (tokenizer included) at the fork; only records and their encodings cross between
processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import pickle
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lockstep.config import DataConfig, DatasetConfig
from lockstep.data import formats, sources, templates
from lockstep.data.render import IGNORE, Options, Renderer
from lockstep.errors import ConfigError, DataError, DatasetError, first_line

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
class BuildStats:
    """What building the samples did, counted over the whole build.

    A subset of the samples (a held-out split) keeps these: what was read stays what was read.
    Counts of the samples themselves (samples, tokens, trained tokens) are Samples' methods,
    computed from the samples held, so they never go stale. Cached with the samples as JSON.
    """

    records: int = 0  # records read and used (bad ones skipped are not counted)
    truncated: int = 0  # samples cut to data.max_length (data.overlong=truncate)
    dropped: int = 0  # samples left out for being longer than data.max_length (overlong=drop)
    skipped: int = 0  # bad records skipped (data.on_bad_record=skip)
    first_skipped: list[str] = field(default_factory=list)  # the first three, in words
    # NOTES kind -> {"count", "first" (where the first record is), "detail"}
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # dataset index (as a string) -> field nothing read -> number of records that have it
    unused: dict[str, dict[str, int]] = field(default_factory=dict)
    packing_efficiency: float | None = None  # packed: real tokens / (rows x data.max_length)
    held_out: int = 0  # samples of the build held out for validation (data.val_fraction)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BuildStats:
        """The stats a cache entry stored; ValueError if they are not a mapping. Keys an
        earlier lockstep also stored (its sample counts: samples, tokens, ...) are left out:
        the samples give those."""
        if not isinstance(data, dict):
            raise ValueError("stats are not a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Samples:
    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    fingerprint: str
    stats: BuildStats = field(default_factory=BuildStats)
    position_ids: list[np.ndarray] | None = None  # packed: positions restart at each sample
    dataset: np.ndarray | None = None  # each row's data.train index (-1: a pack of several)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def packed(self) -> bool:
        """Each row holds several samples (data.packing)."""
        return self.position_ids is not None

    def without_last(self) -> Samples:
        """A copy lacking the last sample, with the fingerprint that content has (testing)."""
        fp = hashlib.sha256(f"{self.fingerprint}|without-last".encode()).hexdigest()[:16]
        positions = self.position_ids[:-1] if self.position_ids is not None else None
        stats = dataclasses.replace(self.stats)
        source = self.dataset[:-1] if self.dataset is not None else None
        return Samples(self.input_ids[:-1], self.labels[:-1], fp, stats, positions, source)

    def subset(self, indices: list[int]) -> Samples:
        """Some of the samples (a held-out split); the counts of the build stay all the data's.

        The fingerprint stays the data's (the one its cache file is named by): which samples a
        split takes follows from the data, the seed and the split's settings, all checked.
        The stats are a copy: setting the subset's `held_out` leaves the whole data's alone.
        """
        pos = [self.position_ids[i] for i in indices] if self.position_ids is not None else None
        ids, labels = [self.input_ids[i] for i in indices], [self.labels[i] for i in indices]
        source = self.dataset[indices] if self.dataset is not None else None
        stats = dataclasses.replace(self.stats)
        return Samples(ids, labels, self.fingerprint, stats, pos, source)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    def token_count(self) -> int:
        """Tokens in the rows held (padding aside: rows are not padded here)."""
        return int(self.lengths().sum())

    def target_token_count(self) -> int:
        """Labels that are not IGNORE in the rows held: the trained tokens, as the start-up log
        and `lockstep data preview` count them."""
        return sum(int(np.count_nonzero(lab != IGNORE)) for lab in self.labels)

    def sample_count(self) -> int:
        """Samples held: the rows, or, packed, the samples in them (each starts at position 0)."""
        if self.position_ids is None:
            return len(self)
        return sum(int(np.count_nonzero(p == 0)) for p in self.position_ids)

    def datasets(self) -> np.ndarray:
        """Each row's data.train index (all 0 when the samples do not say: one dataset)."""
        if self.dataset is None:
            return np.zeros(len(self), dtype=np.int64)
        return self.dataset

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
    from lockstep.data.mixing import configured

    # these cannot change the samples; a mixture changes only their order, or, packed, that
    # each pack holds samples of one dataset
    exclude = {"num_proc", "cache", "cache_dir", "padding_free", "group_by_length", "num_workers"}
    settings = cfg.model_dump(mode="json", exclude=exclude)
    for ds in settings["train"]:
        del ds["weight"], ds["repeat"]
    by_dataset = "|packed by dataset" if cfg.packing and configured(cfg.train) else ""
    text = f"v{DATA_VERSION}|{json.dumps(settings, sort_keys=True)}{by_dataset}"
    h = hashlib.sha256(f"{text}|{tokenizer_fingerprint(tokenizer)}".encode())
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


Batch = list[tuple[int, sources.Record]]  # (dataset index, record), in order


@dataclass
class _Encoder:
    """Encodes batches of records with one renderer: in this process, or in forked workers that
    inherit it (`serve`)."""

    renderer: Renderer
    cfg: DataConfig

    def batch(self, chunk: Batch) -> list[Encoded | str]:
        """Each record's encoding, or the message of its DataError (on_bad_record decides)."""
        out: list[Encoded | str] = []
        for k, rec in chunk:
            try:
                out.append(encode(self.renderer, rec, self.cfg.train[k], self.cfg))
            except DatasetError:
                raise  # a dataset-wide problem: skipping records would hide it
            except DataError as e:
                out.append(str(e))
        return out

    def serve(self, tasks: Any, results: Any) -> None:
        """A worker's loop: (index, batch) from `tasks` until None; (index, encodings, None)
        or (index, None, the error) to `results`."""
        for i, chunk in iter(tasks.get, None):
            try:
                results.put((i, self.batch(chunk), None))
            except Exception as e:
                results.put((i, None, _picklable(e)))


def _picklable(e: Exception) -> Exception:
    """`e` itself when it can be sent to the parent process, else a RuntimeError saying it."""
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {first_line(e)}")


def _encode_in_processes(encoder: _Encoder, batches: list[Batch], n: int) -> Iterator[list]:
    """The encodings of `batches`, in order, from `n` forked workers; a batch's error is raised
    here in its turn, and a worker that dies (killed for memory) is a DataError."""
    ctx = multiprocessing.get_context("fork")  # workers inherit the encoder: nothing to pickle
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=encoder.serve, args=(tasks, results), daemon=True)
               for _ in range(n)]  # fmt: skip
    for w in workers:
        w.start()
    try:
        for item in enumerate(batches):
            tasks.put(item)
        for _ in workers:
            tasks.put(None)
        done: dict[int, tuple[list | None, Exception | None]] = {}
        for i in range(len(batches)):
            while i not in done:
                j, part, error = _next_result(results, workers)
                done[j] = part, error
            part, error = done.pop(i)
            if error is not None:
                raise error
            yield part
    finally:
        tasks.cancel_join_thread()  # batches no worker took (an error ended the work): dropped
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()


def _next_result(results: Any, workers: list) -> tuple[int, list | None, Exception | None]:
    """The next (index, encodings, error) a worker sent; a DataError once a worker has died
    (or all have ended) with nothing more to read."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            codes = [w.exitcode for w in workers]
            dead = [c for c in codes if c not in (None, 0)]
            if dead or None not in codes:
                raise DataError(
                    f"a tokenising process (data.num_proc) ended with exit code {(dead or codes)[0]}"
                    " before its work was done (killed for lack of memory?): lower data.num_proc,"
                    " or set it to 1"
                ) from None


def encode_all(
    cfg: DataConfig, tokenizer: Any
) -> tuple[list[tuple[int, sources.Record]], list[Encoded | str]]:
    """Every record and its encoding (or its error message), in order; data.num_proc processes."""
    records = read_records(cfg)
    encoder = _Encoder(Renderer(tokenizer, Options.of(cfg)), cfg)
    size = max(1, min(2000, len(records) // (cfg.num_proc * 4) or 1))
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    bar = tqdm(total=len(records), desc="tokenise", unit="rec", disable=len(records) < 20_000,
               mininterval=1.0)  # fmt: skip
    results: list[Encoded | str] = []
    if cfg.num_proc > 1 and len(batches) > 1:
        parts = _encode_in_processes(encoder, batches, cfg.num_proc)
    else:
        parts = (encoder.batch(batch) for batch in batches)
    with contextlib.closing(parts), bar:  # closing: the workers end with an error, too
        for part in parts:
            results.extend(part)
            bar.update(len(part))
    return records, results


class _Tally:
    """Counts what a build did, for its BuildStats (plain JSON: cached with the samples)."""

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
    """Tokenise every record; apply the bad-record, overlong and packing policies. The caller
    checked the data section first (check_files: missing files, text files given a chat format)."""
    fp = fp or fingerprint(cfg, tokenizer)
    ids_list: list[np.ndarray] = []
    labels_list: list[np.ndarray] = []
    source: list[int] = []
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
            source.append(k)
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
    stats = BuildStats(
        records=len(records) - len(bad),
        truncated=truncated,
        dropped=dropped,
        skipped=len(bad),
        first_skipped=bad[:3],
        notes=tally.notes,
        unused=tally.unused,
    )
    samples = Samples(ids_list, labels_list, fp, stats, dataset=np.asarray(source, np.int64))
    if cfg.packing:
        from lockstep.data.mixing import configured
        from lockstep.data.packing import pack

        samples = pack(samples, cfg.max_length, by_dataset=configured(cfg.train))
    return samples


def describe(stats: BuildStats, cfg: DataConfig) -> list[tuple[bool, str]]:
    """(is a warning, line) for each note of a build and each dataset's unread fields."""
    lines = []
    for kind, n in stats.notes.items():
        text = NOTES[kind].format(multi_turn=cfg.multi_turn, template=cfg.template)
        where = "; first: " + n["first"] if n["first"] else ""
        detail = f" ({n['detail']})" if n["detail"] else ""
        lines.append((kind in WARNINGS, f"{n['count']} {text}{where}{detail}"))
    for k, counts in stats.unused.items():
        if counts:
            path = cfg.train[int(k)].path if int(k) < len(cfg.train) else f"dataset {k}"
            listed = ", ".join(f"{name} ({n} records)" for name, n in sorted(counts.items()))
            lines.append(
                (False, f"{path}: fields not used: {listed} (ignore_fields silences this)")
            )
    return lines
