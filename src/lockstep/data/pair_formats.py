"""Preference pairs in the layouts datasets come in -> a prompt conversation and two answers.

Pairs come in the supervised formats' layouts (data/formats.py), with two answers in place of
one: alpaca and sharegpt with `chosen` / `rejected` (LLaMA-Factory's pairwise datasets), and
`preference`, TRL's `prompt` / `chosen` / `rejected` (conversational, or plain strings). Each gives
a `Pair`: the prompt conversation and the two assistant answers that follow it. The prompt is
read by the same code as a supervised record's, so a pair's prompt and a conversation of the
same layout are the same messages.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from lockstep.data import formats
from lockstep.data.sources import Record
from lockstep.errors import DataError


@dataclass
class Pair:
    """A preference pair: the prompt conversation and two answers to it (one assistant message
    each), `chosen` preferred to `rejected`."""

    prompt: list[formats.Message]
    chosen: formats.Message
    rejected: formats.Message
    tools: list[dict[str, Any]] | None = None
    unused: tuple[str, ...] = ()

    def conversations(self) -> tuple[formats.Conversation, formats.Conversation]:
        """prompt + chosen and prompt + rejected; in each, only the answer (the last turn) is
        trained: the prompt's assistant turns, if any, are context, as the pair's data says."""
        out = []
        for answer in (self.chosen, self.rejected):
            messages = copy.deepcopy([*self.prompt, answer])
            formats.link_tool_results(messages)
            earlier = frozenset(i for i, m in enumerate(messages[:-1]) if m["role"] == "assistant")
            out.append(formats.Conversation(messages, self.tools, earlier, self.unused))
        return out[0], out[1]


def alpaca_pair(f: formats.Fields) -> Pair:
    """LLaMA-Factory's alpaca pairwise: the alpaca prompt (system, history, instruction, input)
    and two answers, `chosen` and `rejected` (strings)."""
    prompt = formats.alpaca_prompt(f)
    chosen, rejected = (_text_answer(f, key) for key in formats.PAIR_FIELDS)
    return _pair(f, prompt, chosen, rejected, set())


def sharegpt_pair(f: formats.Fields) -> Pair:
    """LLaMA-Factory's sharegpt pairwise: `conversations` (the prompt turns, ending with the
    user's) and `chosen` / `rejected`, each one assistant turn `{from: gpt, value}`."""
    prompt, _, extra = formats.sharegpt_turns(f)
    answers = []
    for key in formats.PAIR_FIELDS:
        name, role_key, text_key = f.name(key), f.name("from"), f.name("value")
        t = f.value(key)
        t = t[0] if isinstance(t, list) and len(t) == 1 else t
        if not isinstance(t, dict) or formats.SHAREGPT_ROLES.get(t.get(role_key)) != "assistant":
            raise DataError(
                f"{f.where}: field {name!r} must be one assistant turn {{{role_key}: gpt, "
                f"{text_key}: ...}}, got {formats.short(t)}"
            )
        answers.append(formats.sharegpt_message(f, t, f"{f.where}: {name}", "assistant"))
        _answer_trained(t, f"{f.where}: {name}")
        extra |= {
            e.replace(f"{name}[].", f"{name}.")
            for e in formats.extra_keys(t, name, {role_key, text_key})
        }
    return _pair(f, prompt, answers[0], answers[1], extra)


def preference(f: formats.Fields) -> Pair:
    """TRL's layout: `prompt`, `chosen`, `rejected`, and an optional `system`.

    Standard: three strings (the prompt is one user message, each answer one assistant
    message). Conversational: `prompt` a list of messages (as the messages format reads them),
    `chosen` / `rejected` lists of messages ending with the assistant's answer. Messages before
    the answer in those lists (TRL's implicit prompt: no `prompt` field, or a text `prompt`
    repeated as their last user message) must be the same in both and continue the prompt.
    """
    extra: set[str] = set()
    answers, before = [], []
    for key in formats.PAIR_FIELDS:
        value, name = f.value(key), f.name(key)
        if isinstance(value, str):
            before.append([])
            answers.append(_text_answer(f, key))
            continue
        messages, untrained, unread = formats.messages_at(f, key)
        extra |= unread
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{f.where}: field {name!r} must end with the answer, an assistant message; "
                f"it ends with a {messages[-1]['role']} message"
            )
        if len(messages) - 1 in untrained:
            raise DataError(f"{f.where}: {name}: a pair's answer has loss weight 0; its answers "
                            "are trained")  # fmt: skip
        before.append(messages[:-1])
        answers.append(messages[-1])
    if before[0] != before[1]:
        raise DataError(
            f"{f.where}: fields {f.name('chosen')!r} and {f.name('rejected')!r} hold different "
            f"messages before their answers; a pair's two answers reply to one prompt (put the "
            f"shared messages in {f.name('prompt')!r} and one answer in each)"
        )
    prompt, unread = _preference_prompt(f, before[0])
    return _pair(f, prompt, answers[0], answers[1], extra | unread)


def _preference_prompt(
    f: formats.Fields, before: list[formats.Message]
) -> tuple[list[formats.Message], set[str]]:
    """The prompt conversation: `system`, then `prompt` (text: one user message; a list:
    messages), then the messages the answers' lists share before the answers."""
    name, value, extra = f.name("prompt"), f.get("prompt"), set()
    if value is None and before:
        prompt = list(before)  # TRL's implicit prompt
    elif isinstance(value, str) and before:
        users = [m for m in before if m["role"] == "user"]
        if not users or str(users[-1].get("content") or "").strip() != value.strip():
            raise DataError(
                f"{f.where}: field {name!r} is text, and {f.name('chosen')!r} / "
                f"{f.name('rejected')!r} begin with a conversation whose last user message is "
                f"not that text; give the prompt once"
            )
        prompt = list(before)  # the prompt written twice, as HuggingFaceH4's datasets do
    elif isinstance(value, list):
        prompt, _, extra = formats.messages_at(f, "prompt")
        prompt += before
    else:
        prompt = [{"role": "user", "content": f.text("prompt")}]
    system = f.text("system", required=False)
    if system and prompt[0]["role"] == "system":
        raise DataError(
            f"{f.where}: a system message in the prompt and a {f.name('system')!r} field: give "
            "the system prompt once"
        )
    return ([{"role": "system", "content": system}] if system else []) + prompt, extra


def _text_answer(f: formats.Fields, key: str) -> formats.Message:
    return {"role": "assistant", "content": f.text(key)}


def _answer_trained(turn: dict, where: str) -> None:
    """An answer of a pair is trained: a loss weight of 0 on it cannot be honoured."""
    if not formats.trained(turn, where, "assistant"):
        raise DataError(f"{where}: a pair's answer has loss weight 0; its answers are trained")


def _pair(f: formats.Fields, prompt: list[formats.Message], chosen: formats.Message, rejected: formats.Message,
          extra: set[str]) -> Pair:  # fmt: skip
    """Check what makes a pair: a prompt ending with the turn the answers reply to, two
    non-empty answers that differ."""
    turns = [m for m in prompt if m["role"] != "system"]
    if not turns or turns[-1]["role"] not in ("user", "tool"):
        got = f"a {turns[-1]['role']} message" if turns else "no user message"
        raise DataError(
            f"{f.where}: the prompt must end with the user's (or a tool's) message that the "
            f"answers reply to; it ends with {got}"
        )
    for key, answer in zip(formats.PAIR_FIELDS, (chosen, rejected), strict=True):
        if not str(answer.get("content") or "").strip() and not answer.get("tool_calls"):
            raise DataError(
                f"{f.where}: field {f.name(key)!r} is empty: a pair needs two answers to compare"
            )
    if _answer_key(chosen) == _answer_key(rejected):
        raise DataError(
            f"{f.where}: {f.name('chosen')!r} and {f.name('rejected')!r} are the same answer, so "
            f"the pair prefers nothing; fix one answer or remove the record"
        )
    tools = formats.read_tools(f.get("tools"), f"{f.where}: field {f.name('tools')!r}")
    return Pair(prompt, chosen, rejected, tools, tuple(sorted(extra)))


def _answer_key(m: formats.Message) -> str:
    """What an answer says, for comparing two (surrounding whitespace aside)."""
    return json.dumps({k: v.strip() if isinstance(v, str) else v for k, v in m.items()},
                      sort_keys=True, ensure_ascii=False)  # fmt: skip


PAIR_READERS = {"alpaca": alpaca_pair, "sharegpt": sharegpt_pair, "preference": preference}


def convert_pair(
    rec: Record, fmt: str, columns: dict[str, str] | None = None, ignore: list[str] | None = None
) -> Pair:
    """A record -> a preference pair; DataError names the record."""
    refusal = (
        f"format {fmt!r} holds no preference pairs; pairs are read from the formats "
        f"{', '.join(PAIR_READERS)} (with chosen / rejected answers)"
    )
    return formats.read(rec, fmt, PAIR_READERS, refusal, columns, ignore, pairs=True)
