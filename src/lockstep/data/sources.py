"""Where records come from: JSON, JSONL, CSV, Parquet and text files, folders of them, HF datasets.

A .txt file is one record `{text: <the whole file>}`: one document, for the `text` format (a
folder of .txt files is a corpus of documents; long ones are split into chunks, not cut).

Every record carries its location ("file:line", "file: row N") so a bad one is reported where
it is. A record that cannot even be parsed is yielded with `error` set, so the caller decides
whether it stops the run or is skipped (data.on_bad_record).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import DataError, first_line

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    where: str
    fields: dict[str, Any]
    error: str | None = None  # set when the record itself cannot be read


def files_of(path: str) -> list[Path]:
    """The data files a `path` names: one file, or the supported files of a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
        return [p]
    if p.is_dir() and not is_saved_dataset(path):
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not found:
            raise DataError(f"{p}: a folder without data files ({', '.join(SUFFIXES)})")
        return found
    return []


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    p = Path(path)
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def is_hub_name(path: str) -> bool:
    """A name like `org/dataset` that is not a local path is read with `datasets`."""
    p = Path(path)
    return (
        not p.exists()
        and not path.startswith((".", "/", "~"))
        and path.count("/") <= 1
        and p.suffix.lower() not in SUFFIXES
    )


def read(path: str, split: str = "train") -> Iterator[Record]:
    files = files_of(path)
    if files:
        for f in files:
            yield from _read_file(f)
    elif is_saved_dataset(path) or is_hub_name(path):
        yield from _read_hf(path, split)
    else:
        raise DataError(f"data file {path!r} not found (looked in {Path(path).resolve()})")


def content_hash(path: str, split: str = "train") -> str:
    """Hash of what `read` would read: file bytes, or the datasets library's own fingerprint."""
    h = hashlib.sha256()
    files = files_of(path)
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not files:
        h.update(getattr(_load_hf(path, split), "_fingerprint", path).encode())
    return h.hexdigest()


def _read_file(p: Path) -> Iterator[Record]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _json_record(line, f"{p}:{lineno}")
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
        for i, obj in enumerate(data):
            yield _checked(obj, f"{p}: record {i}")
    elif suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield Record(f"{p}:{reader.line_num}", {k: v for k, v in row.items() if k})
    elif suffix == ".txt":
        try:
            yield Record(str(p), {"text": p.read_text(encoding="utf-8")})
        except UnicodeDecodeError as e:
            yield Record(str(p), {}, f"not UTF-8 text (byte {e.start})")
    else:  # .parquet
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield Record(f"{p}: row {i}", row)


def _json_record(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(where, {}, f"invalid JSON: {e.msg} (column {e.colno})")
    return _checked(obj, where)


def _checked(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        return Record(where, {}, f"expected a JSON object, got {type(obj).__name__}")
    return Record(where, obj)


def _load_hf(name: str, split: str) -> Any:
    import datasets

    try:
        if is_saved_dataset(name):
            ds = datasets.load_from_disk(name)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all the same to the user
        raise DataError(
            f"data: {name!r} is not a local file or folder, and loading it as a Hugging Face "
            f"dataset (split {split!r}) failed: {first_line(e)}"
        ) from None


def _read_hf(name: str, split: str) -> Iterator[Record]:
    for i, row in enumerate(_load_hf(name, split)):
        yield Record(f"{name}[{split}]: row {i}", dict(row))
