"""Records in the shapes users have -> conversations (lists of {role, content}).

Each record carries its location (file:line) so a bad one is reported where it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import DataError

Message = dict[str, str]


@dataclass(frozen=True)
class Record:
    where: str  # "file:line" for error messages
    fields: dict[str, Any]


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a .jsonl or .json (list of objects) file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} not found (looked in {p.resolve()})")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{p}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                    )
                yield Record(f"{p}:{lineno}", obj)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{p}: record {i}: expected an object, got {type(obj).__name__}")
            yield Record(f"{p}: record {i}", obj)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl or .json)")


def _text(rec: Record, key: str, required: bool = True) -> str:
    value = rec.fields.get(key)
    if value is None:
        if required:
            have = ", ".join(sorted(map(str, rec.fields))) or "none"
            raise DataError(f"{rec.where}: missing field {key!r} (fields present: {have})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{rec.where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def alpaca(rec: Record) -> list[Message]:
    """instruction (+ input) -> user, output -> assistant; optional system and history pairs."""
    instruction, extra = _text(rec, "instruction"), _text(rec, "input", required=False)
    output = _text(rec, "output")
    if not output.strip():
        raise DataError(f"{rec.where}: field 'output' is empty: nothing to train on")
    messages: list[Message] = []
    system = _text(rec, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = rec.fields.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h)
        for h in history
    ):
        raise DataError(f"{rec.where}: field 'history' must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


ROLES = ("system", "user", "assistant", "tool")


def messages(rec: Record) -> list[Message]:
    """OpenAI-style `messages: [{role, content}]`."""
    msgs = rec.fields.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{rec.where}: field 'messages' must be a non-empty list of {{role, content}}"
        )
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{rec.where}: messages[{i}] must be {{role, content}} with role in {ROLES} "
                f"and string content, got {json.dumps(m)[:80]}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{rec.where}: no non-empty assistant message: nothing to train on")
    return out


FORMATS = {"alpaca": alpaca, "messages": messages}


def to_messages(rec: Record, fmt: str) -> list[Message]:
    return FORMATS[fmt](rec)
