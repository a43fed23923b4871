"""Conversation -> samples of token ids and labels, the loss only on the tokens the config trains.

Which tokens are an assistant turn's comes from the chat template itself, never from searching
the text for marker strings, so the mask is exact for the format the model will be prompted with:

- A template with `{% generation %}` marks says so directly: its marks are the mask (the same
  as transformers' `return_assistant_tokens_mask`).
- Otherwise a turn is what the template writes after the prompt the model is given for it:
  `messages[:i]` rendered with `add_generation_prompt` is a prefix of `messages[:i+1]` rendered,
  and the rest is the turn (its reasoning, content, tool calls, end-of-turn marker). Templates
  that never read `add_generation_prompt` (the cue already ends the user turn, as `[/INST]`)
  need nothing special.
- Measured once per template on probe conversations (data/templates.py): text written after
  the last message only
  (an end-of-conversation eos: never trained), a tail of the generation prompt that no
  conversation holds (`<think>\n`: turns are trained as written, without it, and this is said),
  the message field it reads reasoning from, and the form of a tool call it writes.
- A template that writes the system prompt only into the last user turn (a finished
  conversation then holds none): the turn is what it writes after the prompt rendered without
  the system message, trained after the prompt the model is really given, with it.
- A template that writes an earlier turn differently once the conversation goes on (reasoning
  dropped from history, the system prompt moving on) cannot train that turn inside the whole
  conversation without teaching the later form. With data.multi_turn=auto such a record becomes
  several samples, each ending with turns written as they were generated; `whole` refuses it.

Everything the data holds must reach the trained text or be reported: an assistant's content,
reasoning (unless data.reasoning=drop) and tool calls missing from its turn are errors; a system
or user message, or the tools, missing from the rendering are counted, as is a turn with no
end-of-turn marker (the tokenizer's eos is then trained after it where the turn ends its
sample). Each `Rendered` carries these notes; data/dataset.py counts and describes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lockstep.data.formats import Conversation
from lockstep.data.templates import Shape, common_prefix, give, measure
from lockstep.errors import ConfigError, DataError, DatasetError, ModelError, first_line

IGNORE = -100
TRAIN_ON = ("assistant", "last", "all")
SLOW_TOKENIZER = (
    "the tokenizer gives no character offsets (a slow tokenizer); use one with a tokenizer.json "
    "(a fast tokenizer) or data.train_on=all"
)

_FIX = (
    "; give data.chat_template a template that does (or data.train_on=last if only earlier "
    "turns are affected)"
)


@dataclass(frozen=True)
class Options:
    """The data settings that decide what is trained (see DataConfig)."""

    train_on: str = "assistant"
    multi_turn: str = "auto"
    reasoning: str = "keep"
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data: Any) -> Options:
        return cls(data.train_on, data.multi_turn, data.reasoning, dict(data.template_kwargs))


@dataclass
class Rendered:
    samples: list[tuple[list[int], list[int]]]
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(a kind of dataset.NOTES, what happened in this record)."""


@dataclass(frozen=True)
class _Turn:
    prompt: str
    """What the model is given when it writes the turn (the generation prompt)."""
    body: str
    """What the template writes for the turn: reasoning, content, tool calls, end marker."""
    sample: str
    """The text that ends with this turn: prompt + body (+ an end-of-conversation suffix)."""


class Renderer:
    """Renders the conversations of one dataset build with one tokenizer and one set of options."""

    def __init__(self, tokenizer: Any, options: Options | None = None) -> None:
        self.tok = tokenizer
        self.opts = options or Options()
        if self.opts.train_on not in TRAIN_ON:
            raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}")
        self._shapes: dict[str, Shape] = {}

    def render(self, conv: Conversation, where: str) -> Rendered:
        return _Job(self, conv, where).run()

    def template(self, tools: list | None) -> str:
        """The template text (a tokenizer's dict of named templates resolves per record)."""
        if not getattr(self.tok, "chat_template", None):
            raise DatasetError(
                "the tokenizer has no chat template; use a tokenizer that has one (model.path), "
                "give one with data.chat_template (a .jinja file or the template text), or set "
                "data.template to a built-in one (chatml, llama3, plain)"
            )
        try:
            return self.tok.get_chat_template(None, tools)
        except ValueError as e:
            raise DataError(f"the tokenizer's chat template cannot be used: {e}") from None

    def shape(self, source: str) -> Shape:
        if source not in self._shapes:
            self._shapes[source] = measure(self.tok, source, self.opts.template_kwargs)
        return self._shapes[source]


class _Job:
    """One record: its prepared messages, cached renderings of its prefixes, and its notes."""

    def __init__(self, renderer: Renderer, conv: Conversation, where: str) -> None:
        self.tok, self.opts = renderer.tok, renderer.opts
        self.where = where
        self.tools = conv.tools
        self.source = renderer.template(conv.tools)
        self.shape = renderer.shape(self.source)
        self.notes: list[tuple[str, str]] = []
        self.reasoning: dict[int, str] = {}  # what of each assistant turn must be trained
        self.answer: dict[int, str] = {}
        self.messages: list[dict[str, Any]] = []
        for i, m in enumerate(conv.messages):
            if m["role"] == "assistant":
                given = give(m, self.shape, self.opts.reasoning == "drop",
                             f"{where}: assistant message {i + 1}")  # fmt: skip
                m, self.answer[i], self.reasoning[i] = given.message, given.answer, given.reasoning
                if given.dropped:
                    self._note("reasoning_dropped", f"assistant message {i + 1}")
            self.messages.append(m)
        turns = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        self.trained = [i for i in turns if i not in conv.untrained]
        if self.opts.train_on == "last":
            self.trained = self.trained[-1:]
        self._cache: dict[tuple[int, bool, bool], str] = {}
        self._turns: dict[int, _Turn] = {}
        self.texts: list[str] = []  # the texts of the samples made (for the context checks)

    # ------------------------------------------------------------------ top level

    def run(self) -> Rendered:
        if self.opts.train_on == "all":
            ids, _ = self._encode(self.upto(len(self.messages) - 1))
            return Rendered([(ids, list(ids))], self.notes)
        if not self.trained:
            raise DataError(f"{self.where}: no assistant turn to train on")
        after = len(self.messages) - 1 - self.trained[-1]
        if after:  # nothing after the last trained turn is trained: not rendered at all
            self._note("trailing", f"{after} message(s)")
            del self.messages[self.trained[-1] + 1 :]
        if not self.shape.probed:
            self._note("unprobed", "")
        if self.shape.dated:
            self._note("dated", "")
        sample = self._marked_sample if self.shape.marked else self._span_sample
        pieces = [sample(turns) for turns in self._groups()]
        self._check_context("\n".join(self.texts))
        if len(pieces) > 1:
            self._note("split", f"{len(pieces)} samples")
        return Rendered(pieces, self.notes)

    def _groups(self) -> list[list[int]]:
        """The trained turns, sample by sample, in as few samples as exactness allows: the
        conversation up to the last trained turn holds every turn it writes as that turn was
        written when generated; the conversation up to the latest turn it did not hold comes
        next; and so on. One sample per turn with data.multi_turn=split."""
        if self.opts.multi_turn == "split":
            return [[i] for i in self.trained]
        remaining, groups = list(self.trained), []
        while remaining:
            last = remaining[-1]
            text = self.upto(last) if self.shape.marked else self.turn(last).sample
            held = [i for i in remaining[:-1] if self._holds(text, i)] + [last]
            if self.opts.multi_turn == "whole" and len(held) < len(remaining):
                self._refuse_whole(min(set(remaining) - set(held)), text)
            groups.append(held)
            remaining = [i for i in remaining if i not in held]
        return groups[::-1]

    def _holds(self, text: str, i: int) -> bool:
        """`text` writes assistant message i as it is written when generated."""
        try:
            t = self.turn(i)
        except DataError:
            if self.shape.marked:  # the marks train it; only where it stands is unknown
                return False
            raise
        return text.startswith(t.prompt + t.body)

    # ------------------------------------------------------------------ templates without marks

    def _span_sample(self, turns: list[int]) -> tuple[list[int], list[int]]:
        last = turns[-1]
        text = self.turn(last).sample
        spans = {}
        for i in turns:
            t = self.turn(i)
            spans[i] = (len(t.prompt), len((t.prompt + t.body).rstrip()))
        self.texts.append(text)
        return self._sample(text, spans, last)

    def turn(self, i: int) -> _Turn:
        """Assistant message i as it is generated: the prompt the model is given, and what the
        template writes for the turn after it (found by rendering, never by searching)."""
        if i in self._turns:
            return self._turns[i]
        written = self.upto(i)
        for before, given, note in self._routes(i):
            if not written.startswith(before):
                continue
            if note == "prompt_tail":
                self._note(note, repr(self.shape.prompt_tail))
            elif note:
                self._note(note, f"assistant message {i + 1}")
            after = written[len(before) :]
            end = self.shape.end_suffix
            body = after[: -len(end)] if end and after.endswith(end) else after
            self._turns[i] = _Turn(given, body, given + after)
            return self._turns[i]
        self._check_calls(i, written)
        prompt = self._render(i, True)
        at = common_prefix(prompt, written)
        raise DataError(
            f"{self.where}: assistant message {i + 1}: the chat template's generation prompt "
            f"ends {_excerpt(prompt, at)}, but it writes this turn as {_excerpt(written, at)}, "
            f"so the turn cannot be trained as the model will be prompted for it{_FIX}"
        )

    def _routes(self, i: int) -> Iterator[tuple[str, str, str | None]]:
        """Where turn i may start, most likely first: (the text before it in the rendered
        conversation, the prompt the model is given, the note it earns)."""
        prompt = self._render(i, True)
        tail = self.shape.prompt_tail
        yield prompt, prompt, None
        if tail and prompt.endswith(tail):
            yield prompt[: -len(tail)], prompt[: -len(tail)], "prompt_tail"
        rest = [m for m in self.messages[:i] if m["role"] != "system"]
        if not rest or len(rest) == i:
            return
        # a template that writes the system prompt only into the last user turn (a finished
        # conversation has none): the turn is what it writes after the prompt rendered without
        # the system message, and it is trained after the prompt the model is given, with it
        try:
            bare = self._render(i, True, without_system=True)
        except DataError:
            return
        yield bare, prompt, "system_moved"
        if tail and bare.endswith(tail) and prompt.endswith(tail):
            yield bare[: -len(tail)], prompt[: -len(tail)], "system_moved"

    def _sample(
        self, text: str, spans: dict[int, tuple[int, int]], last: int
    ) -> tuple[list[int], list[int]]:
        """Token ids of `text` and labels that keep the tokens overlapping a span. A turn with
        no end-of-turn marker learns to stop on the eos token where it ends the sample: the eos
        the template writes after the last message, or else one appended."""
        spans, append = dict(spans), False
        eos = self.tok.eos_token
        for i, (s, e) in list(spans.items()):
            self._check_turn(i, text[s:e])
            if not self._has_no_end_marker(i, text[s:e]):
                continue
            rest = text[e:].strip()
            if i == last and eos and rest == eos:
                spans[i] = (s, len(text.rstrip()))  # the template's own closing eos
            elif i == last and not rest and self.tok.eos_token_id is not None:
                append = True
                self._note("eos_appended", f"after assistant message {i + 1}")
            else:
                self._note("no_end_marker", f"assistant message {i + 1}")
        ids, offsets = self._encode(text)
        at = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(ids), dtype=bool)
        for s, e in spans.values():  # a token overlapping a span is trained
            trained |= (at[:, 0] < e) & (at[:, 1] > s)
        labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE).tolist()
        if append:
            ids.append(self.tok.eos_token_id)
            labels.append(self.tok.eos_token_id)
        return ids, labels

    # ------------------------------------------------------------------ templates with marks

    def _marked_sample(self, turns: list[int]) -> tuple[list[int], list[int]]:
        """The template's {% generation %} marks are the mask; marks of a turn the config does
        not train here (train_on=last, a loss weight of 0, another sample's turn) are dropped."""
        last = turns[-1]
        out = self._apply(
            self.messages[: last + 1], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, tokenizer_kwargs={"return_offsets_mapping": True},
        )  # fmt: skip
        ids, mask, offsets = out["input_ids"], out["assistant_masks"], out.get("offset_mapping")
        if offsets is None:
            raise ModelError(SLOW_TOKENIZER)
        text = self.upto(last)
        everyone = [i for i in range(last + 1) if self.messages[i]["role"] == "assistant"]
        regions = self._regions(text, everyone)
        if turns != everyone:
            kept = [regions[i] for i in turns]
            mask = [
                bool(m) and any(s <= a < e for s, e in kept)
                for m, (a, _) in zip(mask, offsets, strict=True)
            ]
        if not any(mask):
            raise DataError(
                f"{self.where}: the chat template's {{% generation %}} markers mark no tokens of "
                f"assistant message {last + 1}"
            )
        for i in turns:
            self._check_turn(i, _marked_text(text, offsets, mask, regions[i]))
        self.texts.append(text)
        return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]

    def _regions(self, text: str, turns: list[int]) -> dict[int, tuple[int, int]]:
        """The stretch of `text` each assistant turn owns: from where the conversation before
        it stops agreeing with `text` to where the next one's does."""
        if len(turns) == 1:
            return {turns[0]: (0, len(text))}
        starts = [common_prefix(self.upto(i - 1), text) if i else 0 for i in turns] + [len(text)]
        return {i: (starts[k], starts[k + 1]) for k, i in enumerate(turns)}

    # ------------------------------------------------------------------ checks and notes

    def _check_turn(self, i: int, written: str) -> None:
        """The turn's content, reasoning and tool calls must be in what is trained for it."""
        answer, reasoning = self.answer.get(i, "").strip(), self.reasoning.get(i, "").strip()
        if answer and answer not in written:
            raise DataError(
                f"{self.where}: the chat template does not write the content of assistant "
                f"message {i + 1} into that turn, so it cannot be trained{_FIX}"
            )
        if reasoning and reasoning not in written:
            raise DataError(
                f"{self.where}: the chat template drops the reasoning of assistant message "
                f"{i + 1} (it is not in the text of that turn), so it would not be trained; set "
                f"data.reasoning=drop to train the answers without it, or give data.chat_template "
                f"a template that writes the reasoning of the turn being generated"
            )
        self._check_calls(i, written)

    def _check_calls(self, i: int, written: str) -> None:
        """The turn's tool calls are written, and in `written` (the text trained for the turn).
        Found by rendering the turn again with every called function renamed: a template that
        writes the calls writes the new names; one that ignores them renders the same text."""
        calls = self.messages[i].get("tool_calls") or ()
        if not calls:
            return
        renamed = dict(self.messages[i], tool_calls=[
            {**c, "function": {**c["function"], "name": f"{c['function']['name']}_lockstep_probe"}}
            for c in calls
        ])  # fmt: skip
        name = calls[0]["function"]["name"]
        if self._apply([*self.messages[:i], renamed]) == self.upto(i) or name not in written:
            raise DataError(
                f"{self.where}: the chat template does not write the tool calls of assistant "
                f"message {i + 1} (its call to {name!r} is not in that turn): this template has "
                f"no tool-call format; give data.chat_template one that has, or leave "
                f"tool-calling records out"
            )

    def _has_no_end_marker(self, i: int, written: str) -> bool:
        answer = self.answer.get(i, "").strip()
        return (
            bool(answer)
            and not self.messages[i].get("tool_calls")
            and written.rstrip().endswith(answer)
        )

    def _check_context(self, text: str) -> None:
        """Messages the template leaves out of the rendering are counted, not silently lost."""
        for i, m in enumerate(self.messages):
            content = str(m.get("content") or "").strip()
            if m["role"] == "assistant" or not content or content in text:
                continue
            if m["role"] == "tool" and _json_text(content) in text:
                continue  # a template that writes tool results as JSON strings
            kind = "system_dropped" if m["role"] == "system" else "message_dropped"
            self._note(kind, f"message {i + 1} ({m['role']})")
        if self.tools:  # a template that reads `tools` renders differently without them
            try:
                ignored = self._apply(self.messages, with_tools=False) == self.upto(
                    len(self.messages) - 1
                )
            except DataError:  # it needs them: it reads them
                ignored = False
            if ignored:
                self._note("tools_dropped", ", ".join(t["function"]["name"] for t in self.tools))

    def _refuse_whole(self, i: int, text: str) -> None:
        turn = self.turn(i).sample
        at = common_prefix(turn, text)
        raise DataError(
            f"{self.where}: assistant message {i + 1} is written {_excerpt(turn, at)} when it is "
            f"generated but {_excerpt(text, at)} once the conversation goes on (the template "
            f"rewrites earlier turns), so data.multi_turn=whole cannot train it; "
            f"data.multi_turn=auto trains each turn as it is generated, data.train_on=last "
            f"trains only the last turn"
        )

    def _note(self, kind: str, detail: str) -> None:
        if not any(k == kind for k, _ in self.notes):  # once per record
            self.notes.append((kind, detail))

    # ------------------------------------------------------------------ messages and rendering

    def upto(self, i: int) -> str:
        """The conversation up to and including message i (i = -1: nothing), as text."""
        return self._render(i + 1, False)

    def _render(self, n: int, generation: bool, without_system: bool = False) -> str:
        """messages[:n] as text (with the generation prompt, leaving out system messages)."""
        key = (n, generation, without_system)
        if key not in self._cache:
            messages = self.messages[:n]
            if without_system:
                messages = [m for m in messages if m["role"] != "system"]
            self._cache[key] = self._apply(messages, add_generation_prompt=generation)
        return self._cache[key]

    def _apply(self, messages: list, with_tools: bool = True, **kw: Any) -> Any:
        kw.setdefault("tokenize", False)
        try:
            return self.tok.apply_chat_template(
                messages, tools=self.tools if with_tools else None, chat_template=self.source,
                **self.opts.template_kwargs, **kw,
            )  # fmt: skip
        except Exception as e:  # jinja raises its own error types for the template's rules
            what = "this conversation" if len(messages) >= len(self.messages) else (
                f"the conversation before message {len(messages) + 1} (needed to find where "
                "that turn starts)" if messages else "an empty conversation (needed to find "
                "where the first turn, an assistant's, starts)"
            )  # fmt: skip
            raise DataError(
                f"{self.where}: the chat template rejects {what}: {first_line(e, 200)} (a rule of the "
                f"template itself: change the data, or give data.chat_template)"
            ) from None

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of `text`, tokenised as apply_chat_template(tokenize=True)
        does (no special tokens added: a template that wants bos writes it into the text). The
        fast tokenizer's own backend gives the same ids, four times faster than the wrapper,
        when nothing (truncation, padding, split special tokens) is set on it."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        plain = backend is not None and backend.truncation is None and backend.padding is None
        if plain and not getattr(self.tok, "split_special_tokens", False):
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if out.get("offset_mapping") is None:
            raise ModelError(SLOW_TOKENIZER)
        return list(out["input_ids"]), out["offset_mapping"]


def _marked_text(text: str, offsets: list, mask: list, region: tuple[int, int]) -> str:
    """The text of the marked tokens inside `region`, run by run (spaces inside a run kept)."""
    runs: list[list[int]] = []
    lo, hi = region
    for m, (a, b) in zip(mask, offsets, strict=True):
        if not m or not lo <= a < hi:
            continue
        if runs and a <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    return "\n".join(text[a:b] for a, b in runs)


def _excerpt(text: str, at: int, width: int = 30) -> str:
    """The text around position `at`, where two renderings part: '...before|after...'."""
    before = text[max(0, at - width) : at]
    after = text[at : at + width]
    return repr(("..." if at > width else "") + before + "|" + after)


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]
