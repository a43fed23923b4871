"""Records in the shapes users have -> conversations in the one shape chat templates read.

A conversation is what Hugging Face chat templates take: messages `{role, content}`, where an
assistant message may also hold `reasoning_content` and `tool_calls`
(`[{id, type: function, function: {name, arguments: {...}}}]`, content absent) and a tool message
`tool_call_id` and `name`; plus the record's `tools` (JSON schemas, `{type: function, function}`).
Every format converts to it, so a template sees the same shape whatever the dataset looked like:
alpaca, sharegpt (with function_call / observation turns), OpenAI messages (with content-part
lists, tool calls, reasoning fields), or plain text.

Nothing in a record is lost without a word: each field is read, reported as unused (counted per
dataset in the start-up log and `data preview`), or refused by name when ignoring it would change
what is trained (a KTO label, preference pairs, a loss weight lockstep cannot apply).
`columns` maps lockstep's field names to the dataset's (`{instruction: prompt}`), so a dataset
never needs rewriting to be used.

Preference pairs come in the same layouts (data/pair_formats.py reads them with the pieces
below).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lockstep.data.sources import Record
from lockstep.errors import DataError, DatasetError

Message = dict[str, Any]

# The fields each format reads, by lockstep's names (the keys `columns` may map), and the names
# names `dataset_info.json` files give them, accepted as the same keys.
# alpaca and sharegpt read `chosen` / `rejected` as preference pairs (convert_pair) and refuse them
# in supervised fine-tuning (convert).
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history", "tools", "chosen",
               "rejected"),
    "sharegpt": ("conversations", "system", "tools", "from", "value", "chosen", "rejected"),
    "messages": ("messages", "tools", "role", "content"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "system", "tools", "role", "content"),
}  # fmt: skip
COLUMN_ALIASES = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations", "role_tag": "from", "content_tag": "value"},
    "messages": {"role_tag": "role", "content_tag": "content"},
    "text": {"prompt": "text"},
    "preference": {"role_tag": "role", "content_tag": "content"},
}
PAIR_FIELDS = ("chosen", "rejected")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool", "function": "tool", "ipython": "tool"}  # fmt: skip
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "function_call": "assistant", "function": "tool", "observation": "tool", "tool": "tool",
}  # fmt: skip
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # the names datasets use

# Fields whose meaning would change what is trained: never ignored silently.
REFUSED_FIELDS = {
    "chosen": "a preference pair (chosen / rejected answers) is for preference training",
    "rejected": "a preference pair (chosen / rejected answers) is for preference training",
    "label": "a KTO label marks answers as desirable or not",
    "kto_tag": "a KTO label marks answers as desirable or not",
    "loss_weight": "a per-record loss weight",
    "weight": "a per-record loss weight",
    "images": "media the text refers to (lockstep fine-tunes text-only models)",
    "videos": "media the text refers to (lockstep fine-tunes text-only models)",
    "audios": "media the text refers to (lockstep fine-tunes text-only models)",
}
TURN_WEIGHTS = ("loss_weight", "weight")  # per message: 0 = not trained, 1 = trained


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    untrained: frozenset[int] = frozenset()
    """Assistant messages the record marks as not trained (a per-message loss weight of 0)."""
    unused: tuple[str, ...] = ()
    """Fields of the record that nothing reads (reported, not an error)."""


@dataclass
class Document:
    """Plain text: every token is trained."""

    text: str
    unused: tuple[str, ...] = ()


def check_columns(fmt: str, columns: dict[str, str] | None) -> dict[str, str] | None:
    """`columns` with dataset_info.json names replaced by lockstep's; ValueError on a key the
    format never reads (it would be silently unused)."""
    if not columns:
        return columns
    out: dict[str, str] = {}
    for key, value in columns.items():
        name = COLUMN_ALIASES[fmt].get(key, key)
        if name not in FORMAT_FIELDS[fmt]:
            raise ValueError(
                f"format {fmt!r} reads no field {key!r}; it reads {', '.join(FORMAT_FIELDS[fmt])}"
            )
        if name in out:
            raise ValueError(f"{key!r} and {name!r} name the same field; keep one")
        out[name] = value
    return out


class Fields:
    """A record's fields under lockstep's names (remapped by `columns`); remembers what was read."""

    def __init__(self, rec: Record, columns: dict[str, str] | None) -> None:
        self.where = rec.where
        self.raw = rec.fields
        self.columns = columns or {}
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return self.columns.get(key, key)

    def get(self, key: str) -> Any:
        name = self.name(key)
        self.read.add(name)
        return self.raw.get(name)

    def value(self, key: str) -> Any:
        """The field's value; DataError naming it when it is missing or null."""
        name, value = self.name(key), self.get(key)
        if value is not None:
            return value
        if name in self.raw:  # a CSV or Parquet cell with no value
            raise DataError(f"{self.where}: field {name!r} is null (no value)")
        have = ", ".join(sorted(map(str, self.raw))) or "none"
        mapped = f" (mapped from {key!r} by columns)" if name != key else ""
        raise DataError(f"{self.where}: missing field {name!r}{mapped} (fields present: {have})")

    def text(self, key: str, required: bool = True) -> str:
        if not required and self.get(key) is None:
            return ""
        value = self.value(key)
        if not isinstance(value, str):
            raise DataError(
                f"{self.where}: field {self.name(key)!r} must be a string, got "
                f"{type(value).__name__}"
            )
        return value

    def refuse(self, ignore: list[str], pairs: bool = False) -> None:
        """A field whose meaning the stage would drop (REFUSED_FIELDS; `chosen` / `rejected`
        unless `pairs`), under its own name or the one `columns` gives it, is an error unless
        `columns` reads it as another field or the dataset's ignore_fields sets it aside."""
        read_as = set(PAIR_FIELDS) if pairs else set()
        stage = "preference training" if pairs else "supervised fine-tuning"
        read = {v for k, v in self.columns.items() if k not in REFUSED_FIELDS or k in read_as}
        for key, why in REFUSED_FIELDS.items():
            if key in read_as:
                continue
            for k in dict.fromkeys((self.name(key), key)):
                if self.raw.get(k) is not None and k not in read and k not in ignore:
                    raise DatasetError(
                        f"{self.where}: field {k!r} would change what is trained ({why}), and "
                        f"{stage} does not read it; remove it, or add it to this dataset's "
                        f"ignore_fields to train on the records as if it were absent"
                    )

    def unused(self, ignore: list[str]) -> tuple[str, ...]:
        """Fields nothing read (an empty column is no data)."""
        return tuple(
            str(k)
            for k, v in self.raw.items()
            if k not in self.read and k not in ignore and v is not None
        )


# ---------------------------------------------------------------------------------------------
# formats


def alpaca(f: Fields) -> Conversation:
    """instruction (+ input) -> user, output -> assistant; optional system, history and tools."""
    prompt, output = alpaca_prompt(f), f.text("output")
    if not output.strip():
        raise DataError(f"{f.where}: field {f.name('output')!r} is empty: nothing to train on")
    return _finish(f, [*prompt, {"role": "assistant", "content": output}], set(), set())


def alpaca_prompt(f: Fields) -> list[Message]:
    """system, history ([user, assistant] pairs), then instruction (+ input) as the user turn."""
    instruction, extra = f.text("instruction"), f.text("input", False)
    messages: list[Message] = []
    system = f.text("system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = f.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h)
        for h in history
    ):
        raise DataError(
            f"{f.where}: field {f.name('history')!r} must be a list of [user, assistant] pairs"
        )
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [*messages, {"role": "user", "content": user}]


def sharegpt(f: Fields) -> Conversation:
    """`conversations: [{from, value}]`: human/gpt/system turns, function_call turns (a JSON call
    or list of calls) and observation turns (their results); optional system and tools."""
    messages, untrained, extra = sharegpt_turns(f)
    return _finish(f, messages, untrained, extra)


def sharegpt_turns(f: Fields) -> tuple[list[Message], set[int], set[str]]:
    """(messages, untrained assistant turns, unread turn keys) of `conversations`, with the
    `system` field first."""
    name, role_key, text_key = f.name("conversations"), f.name("from"), f.name("value")
    messages: list[Message] = []
    system = f.text("system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    untrained: set[int] = set()
    extra: set[str] = set()
    for where, t, role in _each_turn(f, "conversations", role_key, text_key, SHAREGPT_ROLES):
        if role == "system" and system:
            raise DataError(
                f"{where}: a system turn and a {f.name('system')!r} field: give the system "
                "prompt once"
            )
        if not trained(t, where, role):
            untrained.add(len(messages))
        messages.append(sharegpt_message(f, t, where, role))
        extra |= extra_keys(t, name, {role_key, text_key})
    return messages, untrained, extra


def sharegpt_message(f: Fields, t: dict, where: str, role: str) -> Message:
    """One {from, value} turn as a message: a function_call turn's value is its JSON call(s)."""
    value = t.get(f.name("value"))
    if not isinstance(value, str):
        raise DataError(f"{where}: {f.name('value')!r} must be a string, got {short(value)}")
    if t[f.name("from")] == "function_call":
        return {"role": role, "tool_calls": _calls_from_json(value, where)}
    return {"role": role, "content": value}


def messages(f: Fields) -> Conversation:
    """OpenAI / Hugging Face style: `messages: [{role, content, ...}]` and optional `tools`.

    content: a string, or a list of parts: `{type: text, text}` (OpenAI) or `{type, value}` with
    types text / reasoning / tool_call; text parts are joined with
    a newline. Assistant messages may carry `reasoning_content` (or `reasoning` / `thinking`),
    `tool_calls` (content may then be null); tool messages `tool_call_id` and `name`. A message's
    `loss_weight` (or `weight`) of 0 leaves that assistant turn untrained.
    """
    out, untrained, extra = messages_at(f, "messages")
    return _finish(f, out, untrained, extra)


def messages_at(f: Fields, field: str) -> tuple[list[Message], set[int], set[str]]:
    """(messages, untrained assistant turns, unread message keys) of the message list `field`."""
    name, role_key, text_key = f.name(field), f.name("role"), f.name("content")
    out: list[Message] = []
    untrained: set[int] = set()
    extra: set[str] = set()
    for where, t, role in _each_turn(f, field, role_key, text_key, ROLES):
        msg: Message = {"role": role}
        value = t.get(text_key)
        if role == "tool" and not isinstance(value, str) and not _is_parts(value):
            value = json.dumps(value, ensure_ascii=False)  # a result given as a JSON value
        text, reasoning, calls = _content(value, where, text_key)
        for key in REASONING_FIELDS:
            if t.get(key) is not None:
                if not isinstance(t[key], str):
                    raise DataError(f"{where}: {key!r} must be a string, got {short(t[key])}")
                reasoning = t[key] if reasoning is None else f"{reasoning}\n{t[key]}"
        if t.get("tool_calls") is not None:
            calls += _tool_calls(t["tool_calls"], f"{where}.tool_calls")
        if t.get("function_call") is not None:  # OpenAI's older single call
            calls += _tool_calls([t["function_call"]], f"{where}.function_call")
        if text is not None:
            msg["content"] = text
        if reasoning is not None and role == "assistant":
            msg["reasoning_content"] = reasoning
        elif reasoning is not None:
            raise DataError(f"{where}: reasoning on a {role} message (only assistants reason)")
        if calls and role != "assistant":
            raise DataError(f"{where}: tool calls on a {role} message (only assistants call)")
        if calls:
            msg["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if t.get(key) is not None:
                msg[key] = str(t[key])
        if text is None and not calls:
            raise DataError(f"{where}: {text_key!r} is missing or null (and no tool calls)")
        known = {role_key, text_key, "tool_calls", "function_call", "tool_call_id", "name",
                 *REASONING_FIELDS}  # fmt: skip
        extra |= extra_keys(t, name, known)
        if not trained(t, where, role):
            untrained.add(len(out))
        out.append(msg)
    return out, untrained, extra


def text(f: Fields) -> Document:
    """Plain pretraining text: every token is trained."""
    value = f.text("text")
    if not value.strip():
        raise DataError(f"{f.where}: field {f.name('text')!r} is empty")
    return Document(value)


FORMATS = {"alpaca": alpaca, "messages": messages, "sharegpt": sharegpt, "text": text}


def convert(
    rec: Record, fmt: str, columns: dict[str, str] | None = None, ignore: list[str] | None = None
) -> Conversation | Document:
    """A record -> a conversation (or a text document); DataError names the record."""
    refusal = (
        f"format {fmt!r} holds preference pairs, which supervised fine-tuning does not read "
        f"(its formats: {', '.join(FORMATS)})"
    )
    return read(rec, fmt, FORMATS, refusal, columns, ignore)


def read(
    rec: Record, fmt: str, readers: dict[str, Any], refusal: str,
    columns: dict[str, str] | None, ignore: list[str] | None, pairs: bool = False,
) -> Any:  # fmt: skip
    """`readers[fmt]` applied to the record, its unread fields noted; `refusal` when no reader
    takes `fmt`. `pairs`: the preference stage reads the record (Fields.refuse)."""
    if rec.error:
        raise DataError(f"{rec.where}: {rec.error}")
    if fmt not in readers:
        raise DatasetError(f"{rec.where}: {refusal}")
    f = Fields(rec, columns)
    f.refuse(ignore or [], pairs=pairs)  # first: the truest thing to say about the record
    out = readers[fmt](f)
    out.unused = tuple(out.unused) + f.unused(ignore or [])
    return out


# ---------------------------------------------------------------------------------------------
# pieces


def _finish(
    f: Fields, messages: list[Message], untrained: set[int], extra: set[str]
) -> Conversation:
    """Link tool results to their calls, read the tools, check there is something to train."""
    link_tool_results(messages)
    tools = read_tools(f.get("tools"), f"{f.where}: field {f.name('tools')!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{f.where}: the conversation has no assistant turn: nothing to train on")
    for i in turns:
        m = messages[i]
        if not str(m.get("content") or "").strip() and not m.get("tool_calls"):
            raise DataError(f"{f.where}: empty assistant turn (message {i + 1})")
    if all(i in untrained for i in turns):
        raise DataError(f"{f.where}: every assistant turn has loss weight 0: nothing to train on")
    return Conversation(messages, tools, frozenset(untrained), tuple(sorted(extra)))


def extra_keys(turn: dict, name: str, known: set[str]) -> set[str]:
    """A turn's keys that nothing reads (reported as `conversations[].key`)."""
    known = known | set(TURN_WEIGHTS)
    return {f"{name}[].{k}" for k, v in turn.items() if k not in known and v is not None}


def _each_turn(
    f: Fields, key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> Iterator[tuple[str, dict, str]]:
    """(where, turn, lockstep's role) for each turn of the list field `key`; a field that is
    no list of turns, or a turn with no known role, is an error naming it."""
    name = f.name(key)
    turns = f.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{f.where}: field {name!r} must be a non-empty list of {{{role_key}, {text_key}}}"
        )
    for i, t in enumerate(turns):
        where = f"{f.where}: {name}[{i}]"
        if not isinstance(t, dict) or t.get(role_key) not in roles:
            raise DataError(
                f"{where} must be {{{role_key}, {text_key}}} with {role_key} in "
                f"{sorted(roles)}, got {short(t)}"
            )
        yield where, t, roles[t[role_key]]


def _content(value: Any, where: str, key: str) -> tuple[str | None, str | None, list]:
    """(text, reasoning, tool calls) of a message's content: a string or a list of parts."""
    if value is None or isinstance(value, str):
        return value, None, []
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a string or a list of parts, got {short(value)}")
    texts, reasoning, calls = [], [], []
    for k, part in enumerate(value):
        here = f"{where}.{key}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        body = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind in ("text", "reasoning", "tool_call") and not isinstance(body, str):
            raise DataError(f"{here}: a {kind} part needs a string 'text' (or 'value')")
        if kind == "text":
            texts.append(body)
        elif kind == "reasoning":
            reasoning.append(body)
        elif kind == "tool_call":
            calls += _calls_from_json(body, here)
        else:
            raise DataError(
                f"{here}: parts of type {kind!r} cannot be trained (lockstep trains text: parts "
                f"of type text, reasoning and tool_call are read), got {short(part)}"
            )
    joined = "\n".join(texts) if texts else None
    return joined, "\n".join(reasoning) if reasoning else None, calls


def _is_parts(value: Any) -> bool:
    """A content-part list: `[{type: ...}, ...]` (anything else in a tool result is JSON)."""
    return value is None or (
        isinstance(value, list) and bool(value) and all(isinstance(p, dict) and "type" in p
                                                        for p in value)
    )  # fmt: skip


def trained(turn: dict, where: str, role: str) -> bool:
    """A turn's loss weight (`loss_weight` or `weight`): 1 or absent trains an assistant turn,
    0 leaves it untrained; other turns are never trained, so they may only say 0."""
    for key in TURN_WEIGHTS:
        w = turn.get(key)
        if w is None:
            continue
        if isinstance(w, bool) or w not in (0, 1) or (role != "assistant" and w != 0):
            raise DataError(
                f"{where}: {key}={w!r}: lockstep trains an assistant turn fully (1) or not at "
                f"all (0); a fractional weight, or a weight on a {role} turn, cannot be applied "
                f"(remove {key!r} from the data)"
            )
        return w == 1
    return True


def _calls_from_json(value: str, where: str) -> list[dict[str, Any]]:
    """A tool call written as JSON text: `{name, arguments}` or a list of them."""
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(
            f'{where}: a tool call must be JSON {{"name": ..., "arguments": {{...}}}}: {e.msg}'
        ) from None
    return _tool_calls(data if isinstance(data, list) else [data], where)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in the shape templates read: {id?, type: function, function: {name, arguments}}
    with arguments a mapping (OpenAI's JSON-string arguments are parsed)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: tool calls must be a non-empty list, got {short(value)}")
    out = []
    for k, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(
                f'{where}[{k}]: a tool call needs a function name: {{"name": ..., '
                f'"arguments": {{...}}}}, got {short(call)}'
            )
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(f"{where}[{k}]: arguments are not valid JSON: {e.msg}") from None
        if not isinstance(args, dict):
            raise DataError(f"{where}[{k}]: arguments must be a JSON object, got {short(args)}")
        tool_call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"],
                                                                      "arguments": args}}  # fmt: skip
        if isinstance(call, dict) and call.get("id") is not None:
            tool_call["id"] = str(call["id"])
        out.append(tool_call)
    return out


def link_tool_results(messages: list[Message]) -> None:
    """Number the calls that have no id (call00001, ...: nine letters and digits, which every
    template accepts) and give each tool result the id and name of the call it answers (the
    call its tool_call_id names, else the next unanswered one) where the data leaves them out."""
    pending: list[dict[str, Any]] = []
    n = 0
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            pending = []
            for call in m["tool_calls"]:
                n += 1
                call.setdefault("id", f"call{n:05d}")
                pending.append(call)
        elif m["role"] == "tool" and pending:
            named = [c for c in pending if c["id"] == m.get("tool_call_id")]
            call = named[0] if named else pending[0]
            pending.remove(call)
            m.setdefault("tool_call_id", call["id"])
            m.setdefault("name", call["function"]["name"])


def read_tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """The functions a record offers: a list (or JSON text of one) of JSON schemas, each in
    the `{type: function, function: {name, description, parameters}}` shape templates read."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON: {e.msg}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of function schemas, got {short(value)}")
    out = []
    for k, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(
                f"{where}[{k}] must be a function schema {{name, description, parameters}}, "
                f"got {short(tool)}"
            )
        out.append({"type": "function", "function": fn})
    return out or None


def short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
