"""Preference pairs -> samples: two rows per pair, the prompt shared, only the answers trained.

A pair (data/pair_formats.py: `convert_pair`) is rendered twice with the model's own chat template,
through the same Renderer as supervised data: prompt + chosen and prompt + rejected. Only the
last turn, the answer, carries labels (the prompt's earlier assistant turns are context: the
data prefers one answer, it says nothing of them). Row 2i of the samples is pair i's chosen
row, row 2i+1 its rejected row; the tokens before the first trained token are the same in both
(checked: a preference compares two answers to one prompt).

A pair that cannot be trained is named by file:line and follows data.on_bad_record: identical
answers, an empty answer, a prompt that leaves no answer token within data.max_length, answers
that data.overlong=truncate cuts to the same tokens. An overlong pair otherwise follows
data.overlong: `truncate` cuts each row's answer at max_length (the prompt stays whole), `drop`
drops both rows. Pairs are never packed: each row is compared whole with its partner.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from lockstep.config import DataConfig, DatasetConfig
from lockstep.data import dataset, pair_formats, sources, templates
from lockstep.data.dataset import Samples
from lockstep.data.render import IGNORE, Options, Renderer
from lockstep.errors import ConfigError, DataError, DatasetError

STAGE = "preference-pairs-1"  # in the fingerprint: pair samples never share a cache entry with SFT
Row = tuple[list[int], list[int]]


@dataclass
class EncodedPair:
    """One record as its two rows (chosen, rejected), fitted to data.max_length."""

    rows: tuple[Row, Row] | None
    """None: data.overlong=drop dropped the pair."""
    prompt_tokens: int
    truncated: int
    """Rows cut to max_length."""
    notes: list[tuple[str, str]]
    unused: tuple[str, ...] = ()


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """The data fingerprint (dataset.fingerprint) marked with the preference stage."""
    base = dataset.fingerprint(cfg, tokenizer)
    return hashlib.sha256(f"{base}|{STAGE}".encode()).hexdigest()[:16]


def check(cfg: DataConfig) -> None:
    """Data settings that cannot hold preference pairs: ConfigError naming the setting."""
    if cfg.packing:
        raise ConfigError(
            "data.packing: preference pairs are not packed (each row is compared whole with its "
            "pair's other row); set data.packing: false"
        )
    if cfg.train_on == "all":
        raise ConfigError(
            "data.train_on=all would train the prompt, which a preference pair does not judge; "
            "pairs train their answers only: set data.train_on: assistant (the default)"
        )


def renderer(cfg: DataConfig, tokenizer: Any) -> Renderer:
    """The Renderer of pairs: the data settings, with only the last turn (the answer) trained."""
    return Renderer(tokenizer, dataclasses.replace(Options.of(cfg), train_on="last"))


def encode_pair(
    render: Renderer, rec: sources.Record, ds: DatasetConfig, cfg: DataConfig
) -> EncodedPair:
    """One record -> its chosen and rejected rows; DataError names the record."""
    pair = pair_formats.convert_pair(rec, ds.format, ds.columns, ds.ignore_fields)
    rows, notes = [], []
    for conv in pair.conversations():
        rendered = render.render(conv, rec.where)
        [row] = rendered.samples  # one trained turn: one sample
        rows.append(row)
        notes += [(k, d) for k, d in rendered.notes if all(k != seen for seen, _ in notes)]
    chosen, rejected = rows
    start = shared_prompt(chosen, rejected, rec.where, render.tok)
    if start >= cfg.max_length:
        raise DataError(
            f"{rec.where}: the prompt is {start} tokens, so data.max_length={cfg.max_length} "
            f"leaves no answer token; raise data.max_length or shorten the prompt"
        )
    longer = [r for r in rows if len(r[0]) > cfg.max_length]
    if longer and cfg.overlong == "drop":
        return EncodedPair(None, start, 0, notes, pair.unused)
    chosen, rejected = (_cut(r, cfg.max_length) for r in rows)
    if chosen == rejected:
        raise DataError(
            f"{rec.where}: cut to data.max_length={cfg.max_length} tokens, the chosen and the "
            f"rejected rows are the same (the answers differ only after that); raise "
            f"data.max_length, or set data.overlong=drop"
        )
    return EncodedPair((chosen, rejected), start, len(longer), notes, pair.unused)


def shared_prompt(chosen: Row, rejected: Row, where: str, tokenizer: Any) -> int:
    """The number of prompt tokens (those before the first trained token), equal in both rows;
    DataError naming the record when the template writes the prompt differently in each."""
    starts = [
        next((i for i, t in enumerate(lab) if t != IGNORE), None) for _, lab in (chosen, rejected)
    ]
    if None in starts:
        raise DataError(f"{where}: the chat template trains no token of an answer")
    a, b = chosen[0][: starts[0]], rejected[0][: starts[1]]
    if a == b:
        return starts[0]
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
    at = differ[0] if differ else min(len(a), len(b))
    before = tokenizer.decode(a[max(0, at - 6) : at])
    raise DataError(
        f"{where}: the chat template writes the prompt differently before the chosen answer "
        f"and before the rejected one (after {before!r}: {tokenizer.decode(a[at : at + 6])!r} "
        f"vs {tokenizer.decode(b[at : at + 6])!r}), so the two rows do not share the prompt "
        f"and the pair compares nothing; give data.chat_template a template that writes the "
        f"prompt the same whatever the answer"
    )


def _cut(row: Row, length: int) -> Row:
    ids, labels = row
    return list(ids[:length]), list(labels[:length])


def build_pairs(cfg: DataConfig, tokenizer: Any, fp: str | None = None) -> Samples:
    """Every pair of data.train as two rows (2i: prompt + chosen, 2i+1: prompt + rejected).

    stats (dataset.BuildStats, cached with the samples): records, truncated and dropped
    (rows), skipped and first_skipped (bad records), notes and unused (dataset.describe reads
    them); the pairs are len(samples) // 2.
    """
    check(cfg)
    fp = fp or fingerprint(cfg, tokenizer)
    render = renderer(cfg, tokenizer)
    rows: list[Row] = []
    source: list[int] = []
    bad: list[str] = []
    truncated = dropped = 0
    tally = dataset._Tally()
    records = dataset.read_records(cfg)
    for k, rec in records:
        try:
            enc = encode_pair(render, rec, cfg.train[k], cfg)
        except DatasetError:
            raise  # a dataset-wide problem: skipping records would hide it
        except DataError as e:
            if cfg.on_bad_record == "error":
                raise DataError(f"{e} (data.on_bad_record=skip skips such records)") from None
            bad.append(str(e))
            continue
        for kind, detail in enc.notes:
            tally.note(kind, rec.where, detail)
        tally.fields(k, enc.unused)
        if enc.rows is None:
            dropped += 2
            continue
        truncated += enc.truncated
        rows += enc.rows
        source += [k] * len(enc.rows)
    split = templates.split_markers(tokenizer, cfg.template)
    if split:
        tally.note("split_markers", "", ", ".join(split), len(records) - len(bad))
    if not rows:
        why = [f"{len(bad)} bad records skipped"] if bad else []
        why += [f"{dropped // 2} longer than data.max_length dropped"] if dropped else []
        raise DataError(
            f"data.train holds no usable preference pairs"
            f"{' (' + ', '.join(why) + ')' if why else ''}: "
            f"{', '.join(ds.path for ds in cfg.train)}"
        )
    ids = [np.asarray(i, dtype=np.int64) for i, _ in rows]
    labels = [np.asarray(lab, dtype=np.int64) for _, lab in rows]
    stats = dataset.BuildStats(
        records=len(records) - len(bad), truncated=truncated, dropped=dropped,
        skipped=len(bad), first_skipped=bad[:3], notes=tally.notes, unused=tally.unused,
    )  # fmt: skip
    return Samples(ids, labels, fp, stats, dataset=np.asarray(source, dtype=np.int64))
