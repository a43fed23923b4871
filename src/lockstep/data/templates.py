"""Which chat template a run trains with, and the built-in ones for tokenizers without.

The tokenizer's own template is the default. `data.chat_template` (a .jinja file or the template
text) replaces it, `data.template` picks a built-in one. Whichever is chosen is set on the
tokenizer once, right after it loads (`model.load.load_tokenizer(..., chat_template=...)`), so the
same text tokenises the data and is saved into every tokenizer lockstep writes: final/,
checkpoints, export. A trained model is then prompted (`lockstep chat`, any server reading its
tokenizer) exactly as it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockstep.errors import ConfigError

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
