"""Which chat template a run trains with, the built-in ones for tokenizers without, and what a
template does that the masks depend on (`measure`).

The tokenizer's own template is the default. `data.chat_template` (a .jinja file or the template
text) replaces it, `data.template` picks a built-in one. Whichever is chosen is set on the
tokenizer once, right after it loads (`model.load.load_tokenizer(..., chat_template=...)`), so the
same text tokenises the data and is saved into every tokenizer lockstep writes: final/,
checkpoints, export. A trained model is then prompted (`lockstep chat`, any server reading its
tokenizer) exactly as it was trained.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import ConfigError, DataError

# Fallbacks for tokenizers without a chat template (`data.template`). Each marks the assistant
# content plus its end-of-turn marker with {% generation %}: the model learns to stop.
CHATML = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['role'] == 'assistant' %}
{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}
{%- else %}
{{- message['content'] + '<|im_end|>' }}
{%- endif %}
{{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

LLAMA3 = r"""
{{- '<|begin_of_text|>' }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
{%- if message['role'] == 'assistant' %}
{% generation %}{{- message['content'] + '<|eot_id|>' }}{% endgeneration %}
{%- else %}
{{- message['content'] + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

# The space after "Assistant:" belongs to the trained turn, so a prompt ends on a clean token
# boundary instead of a trailing space (BPE merges " word"; a lone trailing " " is a token the
# model never saw before a word).
PLAIN = r"""
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- 'Assistant:' }}{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}
{%- else %}
{{- (message['role'] | capitalize) + ': ' + message['content'] }}
{%- endif %}
{{- '\n\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}
"""

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}
# the marker strings each built-in writes; each should be one token of the tokenizer
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "plain": (),
}
TEMPLATE_SUFFIXES = (".jinja", ".j2", ".jinja2", ".txt")


def configured(data: Any) -> str | None:
    """The template text `data.chat_template` / `data.template` asks for; None: the tokenizer's."""
    if data.template is not None:
        return BUILTIN[data.template]
    value = data.chat_template
    if value is None:
        return None
    if is_inline(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.chat_template: file {value!r} not found (looked in {path.resolve()}); give a "
            "path to a .jinja file, or the template itself (text with {{ ... }} / {% ... %})"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.chat_template: cannot read {value!r}: {e}") from None


def is_inline(value: str) -> bool:
    """Template text rather than a path: it holds a Jinja tag or expression."""
    return "{%" in value or "{{" in value


def split_markers(tokenizer: Any, name: str | None) -> list[str]:
    """The markers of built-in template `name` that this tokenizer has no single token for: the
    model would learn to end turns with a string of ordinary tokens."""
    if name is None:
        return []
    return [m for m in MARKERS[name] if len(tokenizer.encode(m, add_special_tokens=False)) != 1]


# ---------------------------------------------------------------------------------------------
# what a template does, measured by rendering probe conversations

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as apply_chat_template detects it
_READS_REASONING = re.compile(r"(?:\.|\[\s*['\"])(reasoning_content|thinking|reasoning)\b")
_PROBE = [
    {"role": "user", "content": "ping"},
    {"role": "assistant", "content": "pong"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "pang"},
]
_CALL = {"type": "function", "function": {"name": "probe_fn", "arguments": {"x": 1}}}
# how a tool-call message without text may be given to a template: tried in this order
_CALL_FORMS = [(content, args) for args in ("mapping", "json") for content in ("absent", "", None)]


@dataclass(frozen=True)
class Shape:
    """What a template does that the masks depend on, measured once on probe conversations."""

    marked: bool
    end_suffix: str = ""
    """Written after the last message only (an end-of-conversation eos): never trained."""
    prompt_tail: str = ""
    """The end of the generation prompt that the template does not write before a turn."""
    reasoning_fields: tuple[str, ...] = ()
    """Message fields the template reads reasoning from (else reasoning goes inline)."""
    call_content: str | None = "absent"
    """A tool-call message's empty content as this template needs it: absent, "" or None."""
    call_arguments: str = "mapping"
    """Tool-call arguments as a mapping (the standard) or as JSON text (some templates)."""
    probed: bool = True
    """False: the template refused the probe conversations, so nothing above was measured."""
    dated: bool = False
    """The template writes today's date (strftime_now): samples depend on the day."""


def measure(tokenizer: Any, source: str, template_kwargs: dict[str, Any]) -> Shape:
    """The Shape of template `source`, rendered with `tokenizer` and the run's variables."""

    def text(messages: list, **kw: Any) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=source, tokenize=False, **template_kwargs, **kw
        )

    fields = tuple(dict.fromkeys(_READS_REASONING.findall(source)))
    marked = bool(_GENERATION.search(source))
    dated = "strftime_now" in source
    try:
        one = text(_PROBE[:2])
        two = text(_PROBE)
        prompt = text(_PROBE[:1], add_generation_prompt=True)
    except Exception:  # a template with rules the probe breaks: measure nothing, say so
        return Shape(marked, reasoning_fields=fields, probed=False, dated=dated)
    suffix = one[_token_cut(tokenizer, one, common_prefix(one, two)) :]
    if not suffix.strip() or "pong" in suffix or not two.endswith(suffix):
        suffix = ""
    tail = ""
    if not one.startswith(prompt):
        tail = prompt[_token_cut(tokenizer, prompt, common_prefix(prompt, one)) :]
        if "pong" in tail or "ping" in tail:
            tail = ""
    content, args = _call_form(text)
    return Shape(marked, suffix, tail, fields, content, args, dated=dated)


def _call_form(text: Callable[..., str]) -> tuple[str | None, str]:
    """The first form of a tool-call message the template writes the call of; else the first
    it renders at all (so a record with calls gets "no tool-call format", not a template error
    about a missing field)."""
    renders = None
    for content, args in _CALL_FORMS:
        call = dict(_CALL, function=dict(_CALL["function"]))
        if args == "json":
            call["function"]["arguments"] = '{"x": 1}'
        message: dict[str, Any] = {"role": "assistant", "tool_calls": [call]}
        if content != "absent":
            message["content"] = content
        try:
            written = text([_PROBE[0], message])
        except Exception:
            continue
        if "probe_fn" in written:
            return content, args
        renders = renders or (content, args)
    return renders or ("absent", "mapping")


def _token_cut(tokenizer: Any, text: str, at: int) -> int:
    """`at` moved back to the start of the token of `text` it falls inside (a probe's two
    renderings may share the first characters of two different marker tokens)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).get(
        "offset_mapping"
    )
    for s, e in offsets or ():
        if s < at < e:
            return s
    return at


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search: the texts are long and share most of their start
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------------------
# an assistant message as a template of that shape wants it


@dataclass(frozen=True)
class Given:
    message: dict[str, Any]
    """The message to render."""
    answer: str
    """Its content without reasoning: it must be in the trained turn."""
    reasoning: str
    """Its reasoning, where it must be trained too ("" when there is none or it was dropped)."""
    dropped: bool = False
    """Its reasoning was removed (data.reasoning=drop)."""


def give(m: dict[str, Any], shape: Shape, drop_reasoning: bool, what: str) -> Given:
    """Reasoning in the field the template reads, or inline <think> text in the content (the
    data's own, or written the common way); tool calls in the form the template writes."""
    m = dict(m)
    content = m.get("content")
    field = m.pop("reasoning_content", None)
    inline = _split_reasoning(content) if content else None
    if inline and field is not None:
        raise DataError(
            f"{what} has reasoning twice (a reasoning_content field and <think> in its "
            "content); keep one"
        )
    reasoning, answer = inline or (field, content)
    kept, dropped = "", False
    if reasoning is not None and reasoning.strip():
        if drop_reasoning:
            if not (answer or "").strip() and not m.get("tool_calls"):
                raise DataError(
                    f"{what} is only reasoning: with data.reasoning=drop nothing of it is left "
                    "to train"
                )
            m, dropped = _with_content(m, answer.lstrip() if inline and answer else answer), True
        elif shape.reasoning_fields:
            m = _with_content(m, answer.lstrip("\n") if answer else answer)
            m.update(dict.fromkeys(shape.reasoning_fields, reasoning))
            kept = reasoning
        elif not inline:
            m = _with_content(m, f"<think>\n{reasoning.strip()}\n</think>\n\n{answer or ''}")
            kept = reasoning
        else:  # the data's own inline text stays as written
            kept = reasoning
    if m.get("tool_calls"):
        if not m.get("content"):
            m.pop("content", None)
            if shape.call_content != "absent":
                m["content"] = shape.call_content
        if shape.call_arguments == "json":
            m["tool_calls"] = [_json_arguments(c) for c in m["tool_calls"]]
    return Given(m, answer or "", kept, dropped)


def _split_reasoning(content: str) -> tuple[str, str] | None:
    """(reasoning, answer) of content written `<think>...</think>answer`, else None."""
    body = content.lstrip()
    if not body.startswith("<think>") or "</think>" not in body:
        return None
    reasoning, answer = body[len("<think>") :].split("</think>", 1)
    return reasoning, answer


def _with_content(m: dict[str, Any], content: str | None) -> dict[str, Any]:
    m = dict(m)
    if content:
        m["content"] = content
    else:
        m.pop("content", None)
    return m


def _json_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    args = fn["arguments"]
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {**call, "function": {**fn, "arguments": text}}
