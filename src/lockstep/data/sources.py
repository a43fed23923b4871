"""Where records come from: JSON, JSONL, CSV, Parquet and text files, folders of them, HF datasets.

`builtin:NAME` names a data file shipped with lockstep (the examples' demo data, e.g.
`builtin:demo_train.jsonl`), so a shipped or copied config reads it from any folder.

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

from lockstep import hub
from lockstep.errors import DataError, first_line, reason

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@dataclass(frozen=True)
class Record:
    where: str
    fields: dict[str, Any]
    error: str | None = None  # set when the record itself cannot be read


def builtin_names() -> list[str]:
    """The data files shipped with lockstep, as a config names them (`builtin:NAME`)."""
    files = BUILTIN_DATA.glob("*") if BUILTIN_DATA.is_dir() else []
    return sorted(BUILTIN_PREFIX + f.name for f in files if f.suffix.lower() in SUFFIXES)


def local(path: str) -> str:
    """Where the data a config's `path` names is read from: a `builtin:NAME` is the shipped
    file NAME (wherever lockstep is installed), any other path is itself. An unknown
    built-in name is a DataError listing the shipped ones."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    if path not in builtin_names():
        shipped = ", ".join(builtin_names()) or "none (this lockstep install lacks its data)"
        raise DataError(f"no data file {path!r} ships with lockstep; shipped: {shipped}")
    return str(BUILTIN_DATA / path[len(BUILTIN_PREFIX) :])


def files_of(path: str) -> list[Path]:
    """The data files a `path` names: one file, or the supported files of a folder (sorted)."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DataError(f"{p}: a symbolic link to nothing (its target is missing, or a loop)")
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
    return not p.exists() and hub.looks_like_id(path) and p.suffix.lower() not in SUFFIXES


def read(path: str, split: str = "train") -> Iterator[Record]:
    path = local(path)
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
    path = local(path)
    files = files_of(path)
    for f in files:
        h.update(f.name.encode())
        try:
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise DataError(f"{f}: cannot read it: {reason(e)}") from None
    if not files and not (is_saved_dataset(path) or is_hub_name(path)):
        raise DataError(f"data file {path!r} not found (looked in {Path(path).resolve()})")
    if not files:
        h.update(getattr(_load_hf(path, split), "_fingerprint", path).encode())
    return h.hexdigest()


def _read_file(p: Path) -> Iterator[Record]:
    """The records of one file; a file that cannot be read at all is one DataError naming it."""
    try:
        yield from _records_of(p)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read it: {reason(e)}") from None
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to read") from None
    except Exception as e:  # pyarrow's errors for a damaged Parquet file, and the like
        raise DataError(
            f"{p}: not a readable {p.suffix.lower()[1:]} file: {first_line(e)}"
        ) from None


def _records_of(p: Path) -> Iterator[Record]:
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv"):
        _refuse_compressed(p)
    if suffix == ".jsonl":
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield from _jsonl_line(raw, lineno, p)
    elif suffix == ".json":
        text = p.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
        surrogates = _surrogate_escape(text)
        for i, obj in enumerate(data):
            yield _checked(obj, f"{p}: record {i}", surrogates)
    elif suffix == ".csv":
        with p.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield Record(f"{p}:{reader.line_num}", {k: v for k, v in row.items() if k})
    elif suffix == ".txt":
        try:
            yield Record(str(p), {"text": p.read_text(encoding="utf-8-sig")})
        except UnicodeDecodeError as e:
            yield Record(str(p), {}, f"not UTF-8 text (byte {e.start})")
    else:  # .parquet
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield Record(f"{p}: row {i}", row)


_GZIP_MAGIC = b"\x1f\x8b"


def _surrogate_escape(text: str) -> bool:
    """JSON text with a \\ud800-\\udfff escape: the only way a JSON string can hold a UTF-16
    surrogate."""
    return "\\ud" in text or "\\uD" in text


def _refuse_compressed(p: Path) -> None:
    with p.open("rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            raise DataError(
                f"{p}: gzip-compressed data under a {p.suffix} name: decompress it first "
                f"(gunzip -c {p.name} > plain{p.suffix})"
            )


def _jsonl_line(raw: bytes, lineno: int, p: Path) -> Iterator[Record]:
    where = f"{p}:{lineno}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        yield Record(where, {}, f"not UTF-8 text (byte {e.start} of the line)")
        return
    if line.strip():
        yield _json_record(line, where)


def _json_record(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(where, {}, f"invalid JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return Record(where, {}, "JSON nested too deeply to read")
    return _checked(obj, where, _surrogate_escape(line))


def _checked(obj: Any, where: str, surrogates: bool = False) -> Record:
    """A record if `obj` is a JSON object of real text; `surrogates`: the JSON text held a
    surrogate escape, so its strings are checked for one left unpaired (not text: no
    tokenizer can encode it)."""
    if not isinstance(obj, dict):
        return Record(where, {}, f"expected a JSON object, got {type(obj).__name__}")
    if surrogates and _has_lone_surrogate(obj):
        return Record(
            where, {}, "a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff): not text"
        )
    return Record(where, obj)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


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
