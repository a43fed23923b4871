"""Conversation -> token ids and labels, with the loss only on the tokens the config trains.

Which tokens are the assistant's comes from the chat template itself, never from searching the
output for strings, so it is exact for the format the model will be prompted with. A template
with `{% generation %}` markers says so directly. Most real ones (Qwen2, Llama-3, Mistral, ...)
have none; for those each assistant turn is the text it appends to the rendered conversation
before it. That is exact only for prefix-stable templates (rendering more turns only appends),
so it is checked, never assumed: a template that rewrites earlier turns is an error, not a
silently wrong mask.
"""

from __future__ import annotations

import re
from typing import Any

from lockstep.errors import ConfigError, DataError, ModelError

IGNORE = -100
TRAIN_ON = ("assistant", "last", "all")

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

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    where: str,
    train_on: str = "assistant",
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels); labels are IGNORE on the tokens `train_on` leaves out.

    `train_on`: "assistant" (every assistant turn), "last" (the last one), "all" (every token).
    `template`: None for the tokenizer's own chat template, or a name in TEMPLATES.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    chat_template = _chat_template(tokenizer, template)
    turns = _assistant_turns(messages, where)
    text = _apply(tokenizer, chat_template, messages, where)
    # apply_chat_template(tokenize=True) tokenizes its text exactly so: no special tokens added,
    # since a template that wants bos writes it into the text.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=train_on != "all")
    ids = list(enc["input_ids"])
    if train_on == "all":
        return ids, ids.copy()
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ModelError(
            "the tokenizer gives no character offsets (a slow tokenizer); use one with a "
            "tokenizer.json (a fast tokenizer) or train_on: all"
        )
    if _GENERATION.search(chat_template):
        mask = _marked(tokenizer, chat_template, messages, where)
        if train_on == "last" and len(turns) > 1:  # the marks cover every turn: keep the last
            start, _ = _span(tokenizer, chat_template, messages, turns[-1], text, where)
            mask = [m and e > start for m, (_, e) in zip(mask, offsets, strict=True)]
    else:
        trained = turns[-1:] if train_on == "last" else turns
        spans = [_span(tokenizer, chat_template, messages, i, text, where) for i in trained]
        mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return ids, labels


def _chat_template(tokenizer: Any, name: str | None) -> str:
    if name is not None:
        if name not in TEMPLATES:
            raise ConfigError(
                f"data.template: unknown template {name!r}; choose from {', '.join(TEMPLATES)}"
            )
        return TEMPLATES[name]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; use a tokenizer that has one (model.path) or "
            f"set data.template to one of {', '.join(TEMPLATES)}"
        )
    try:  # resolves a tokenizer's dict of named templates to its default
        return tokenizer.get_chat_template()
    except ValueError as e:
        raise DataError(f"the tokenizer's chat template cannot be used: {e}") from None


def _assistant_turns(messages: list[dict[str, str]], where: str) -> list[int]:
    """Indices of the assistant messages; an empty one would train only an end-of-turn marker."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    for i in turns:
        if not str(messages[i].get("content") or "").strip():
            raise DataError(f"{where}: empty assistant turn (message {i + 1})")
    return turns


def _apply(
    tokenizer: Any,
    chat_template: str,
    messages: list[dict[str, str]],
    where: str,
    **kwargs: Any,
) -> Any:
    """apply_chat_template (text unless asked otherwise), its errors as the record's DataError."""
    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, **kwargs)
    except Exception as e:  # jinja raises its own error types for role-order violations
        raise DataError(f"{where}: the chat template rejects this conversation: {e}") from None


def _marked(
    tokenizer: Any, chat_template: str, messages: list[dict[str, str]], where: str
) -> list[int]:
    """The template's own mask, from its {% generation %} markers."""
    out = _apply(
        tokenizer, chat_template, messages, where,
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )  # fmt: skip
    mask = list(out["assistant_masks"])
    if not any(mask):
        raise DataError(f"{where}: the chat template's {{% generation %}} markers mark no tokens")
    return mask


def _span(
    tokenizer: Any,
    chat_template: str,
    messages: list[dict[str, str]],
    i: int,
    text: str,
    where: str,
) -> tuple[int, int]:
    """Characters of `text` that assistant message i adds: its content and end-of-turn marker.

    `before` ends with the generation prompt (the assistant header), which is what the model is
    given at inference, so the header stays untrained; whitespace after the turn's end marker
    (a separator the next turn could equally own) is left out.
    """
    fix = "set data.template or use a chat template with {% generation %} markers"
    if i == 0:
        raise DataError(
            f"{where}: the conversation starts with an assistant turn, so its start cannot be "
            f"found by rendering what comes before it; {fix}"
        )
    if "add_generation_prompt" not in chat_template:
        raise DataError(
            f"{where}: the chat template ignores add_generation_prompt, so where an assistant "
            f"turn starts is unknown; {fix}"
        )
    before = _apply(tokenizer, chat_template, messages[:i], where, add_generation_prompt=True)
    upto = _apply(tokenizer, chat_template, messages[: i + 1], where)
    if not (text.startswith(upto) and upto.startswith(before)):
        raise DataError(
            f"{where}: the chat template is not prefix-stable (rendering a longer conversation "
            f"changes the text of earlier turns, e.g. it rewrites or drops them), so the tokens "
            f"of assistant message {i + 1} cannot be told apart; {fix}"
        )
    return len(before), len(upto.rstrip())
