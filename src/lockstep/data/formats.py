"""Records in the shapes users have -> conversations (lists of {role, content}), or plain text.

`columns` maps lockstep's field names to the dataset's (`{instruction: prompt}`), so a dataset
never needs rewriting to be used.
"""

from __future__ import annotations

import json
from typing import Any

from lockstep.data.sources import Record
from lockstep.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "function_call": "assistant", "function": "tool", "observation": "tool", "tool": "tool",
}  # fmt: skip


class Fields:
    """A record's fields under lockstep's names (remapped by `columns`), with typed getters."""

    def __init__(self, rec: Record, columns: dict[str, str] | None) -> None:
        self.where = rec.where
        self.raw = rec.fields
        self.columns = columns or {}

    def get(self, key: str) -> Any:
        return self.raw.get(self.columns.get(key, key))

    def text(self, key: str, required: bool = True) -> str:
        name = self.columns.get(key, key)
        value = self.raw.get(name)
        if value is None:
            if required:
                have = ", ".join(sorted(map(str, self.raw))) or "none"
                mapped = f" (mapped from {key!r} by columns)" if name != key else ""
                raise DataError(
                    f"{self.where}: missing field {name!r}{mapped} (fields present: {have})"
                )
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{self.where}: field {name!r} must be a string, got {type(value).__name__}"
            )
        return value


def alpaca(f: Fields) -> list[Message]:
    """instruction (+ input) -> user, output -> assistant; optional system and history pairs."""
    instruction, extra, output = f.text("instruction"), f.text("input", False), f.text("output")
    if not output.strip():
        raise DataError(f"{f.where}: field 'output' is empty: nothing to train on")
    messages: list[Message] = []
    system = f.text("system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = f.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h)
        for h in history
    ):
        raise DataError(f"{f.where}: field 'history' must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def messages(f: Fields) -> list[Message]:
    """OpenAI style: `messages: [{role, content}]`."""
    return _turns(f, "messages", "role", "content", {r: r for r in ROLES})


def sharegpt(f: Fields) -> list[Message]:
    """`conversations: [{from, value}]` with human/gpt/system/function... speakers."""
    return _turns(f, "conversations", "from", "value", SHAREGPT_ROLES)


def _turns(
    f: Fields, key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[Message]:
    turns = f.get(key)
    name = f.columns.get(key, key)
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{f.where}: field {name!r} must be a non-empty list of {{{role_key}, {text_key}}}"
        )
    out: list[Message] = []
    for i, t in enumerate(turns):
        if (
            not isinstance(t, dict)
            or t.get(role_key) not in roles
            or not isinstance(t.get(text_key), str)
        ):
            raise DataError(
                f"{f.where}: {name}[{i}] must be {{{role_key}, {text_key}}} with {role_key} in "
                f"{sorted(roles)} and a string {text_key}, got {json.dumps(t)[:80]}"
            )
        out.append({"role": roles[t[role_key]], "content": t[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{f.where}: no assistant turn in {name!r}: nothing to train on")
    return out


def text(f: Fields) -> str:
    """Plain pretraining text: every token is trained."""
    value = f.text("text")
    if not value.strip():
        raise DataError(f"{f.where}: field {f.columns.get('text', 'text')!r} is empty")
    return value


FORMATS = {"alpaca": alpaca, "messages": messages, "sharegpt": sharegpt, "text": text}


def convert(rec: Record, fmt: str, columns: dict[str, str] | None = None) -> list[Message] | str:
    """A record -> a conversation (or text for the `text` format); DataError names the record."""
    if rec.error:
        raise DataError(f"{rec.where}: {rec.error}")
    return FORMATS[fmt](Fields(rec, columns))
