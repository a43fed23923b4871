"""Conversation -> token ids and labels, with the loss on assistant tokens only.

The mask comes from the chat template itself (its `{% generation %}` markers), never from
guessing strings, so it is exact for the template the model will be used with.
"""

from __future__ import annotations

from typing import Any

from lockstep.errors import DataError

IGNORE = -100


def render(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels); labels are IGNORE outside assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; use a tokenizer that has one "
            "(model.path) or a model folder whose tokenizer_config.json sets chat_template"
        )
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as e:  # jinja raises its own error types for role-order violations
        raise DataError(f"{where}: the chat template rejects this conversation: {e}") from None
    ids = list(out["input_ids"])
    mask = list(out.get("assistant_masks") or [])
    if len(mask) != len(ids) or not any(mask):
        raise DataError(
            f"{where}: the chat template marks no assistant tokens; its template needs "
            "{% generation %} markers around assistant content"
        )
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return ids, labels
