"""The before/after table at the end of a run (eval.show): what fine-tuning changed.

Each of the first N eval samples is cut where its first trained token is: the tokens before it
are the prompt exactly as training rendered it (chat template, system prompt, generation
prompt), and the trained tokens from there to the next untrained one are the answer the data
gives. The model as the run started (the same initial weights, or the pretrained model) and the
trained model answer each prompt greedily; an answer is right when its text equals the data's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lockstep.data.dataset import Samples
from lockstep.data.render import IGNORE

WIDTHS = (64, 30, 30, 30, 5)  # characters each column shows at most


@dataclass
class Row:
    prompt: str
    expected: str
    before: str
    after: str


def prompts(samples: Samples, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, answer ids) of the first `n` samples that train something; of a packed row,
    its first sample."""
    out = []
    for i in range(len(samples)):
        ids, labels = samples.input_ids[i], samples.labels[i]
        if samples.position_ids is not None:
            starts = np.flatnonzero(samples.position_ids[i] == 0)
            end = int(starts[1]) if len(starts) > 1 else len(ids)
            ids, labels = ids[:end], labels[:end]
        trained = np.flatnonzero(labels[1:] != IGNORE) + 1
        if not len(trained):
            continue
        first = stop = int(trained[0])
        while stop < len(labels) and labels[stop] != IGNORE:
            stop += 1
        out.append((ids[:first], ids[first:stop]))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def generate(model: Any, prompt: np.ndarray, max_new: int, stop_ids: list[int], pad: int) -> list:
    """The greedy continuation of `prompt`, ending at the first of `stop_ids`."""
    device = next(model.parameters()).device
    x = torch.as_tensor(prompt, dtype=torch.long, device=device)[None]
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
        eos_token_id=stop_ids, pad_token_id=pad,
    )  # fmt: skip
    return out[0, x.shape[1] :].tolist()


def table(before: Any, after: Any, tokenizer: Any, samples: Samples, n: int) -> list[Row]:
    """Rows of the first `n` eval samples: prompt, the data's answer, the two models' answers."""
    was = before.training, after.training
    before.eval(), after.eval()
    specials = set(tokenizer.all_special_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt, answer in prompts(samples, n):
        # the answer's last token is the template's end of turn when it is a special token
        stop = [t for t in {tokenizer.eos_token_id, int(answer[-1])} if t in specials]
        said = [
            text(tokenizer, generate(m, prompt, len(answer) + 8, stop, pad))
            for m in (before, after)
        ]
        rows.append(Row(shown_prompt(tokenizer, prompt), text(tokenizer, answer), *said))
    before.train(was[0]), after.train(was[1])
    return rows


def text(tokenizer: Any, ids) -> str:
    """Token ids as one line of text, special tokens left out."""
    return " ".join(tokenizer.decode(list(ids), skip_special_tokens=True).split())


def shown_prompt(tokenizer: Any, prompt: np.ndarray) -> str:
    """The user's message of a prompt when the template wraps one message in a fixed head and
    tail (then the markup is left out); else the whole prompt's text."""
    full = tokenizer.decode(list(prompt), skip_special_tokens=False)
    try:
        mark = "\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
        head, tail = rendered.split(mark)
    except Exception:  # no template, or one that will not render this probe
        head = tail = None
    if head is not None and full.startswith(head) and full.endswith(tail):
        return " ".join(full[len(head) : len(full) - len(tail)].split())
    return text(tokenizer, prompt)


def render(rows: list[Row], shown: int | None = None) -> str:
    """The table, a line per row (the first `shown` rows only, when given), and the count of
    right answers before and after over every row."""
    right_after = sum(r.after == r.expected for r in rows)
    right_before = sum(r.before == r.expected for r in rows)
    head = ("prompt", "data says", "before training", "after training", "right")
    cells = [
        (r.prompt, r.expected, r.before or "(nothing)", r.after or "(nothing)",
         "yes" if r.after == r.expected else "no")
        for r in rows[:shown]
    ]  # fmt: skip
    cut = [[_cut(c, w) for c, w in zip(row, WIDTHS, strict=True)] for row in [head, *cells]]
    widths = [max(len(row[k]) for row in cut) for k in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cut]  # fmt: skip
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(
        f"after training {right_after} of {len(rows)} answers are the data's (before: "
        f"{right_before} of {len(rows)}); greedy, eval.show={len(rows)}"
    )
    return "\n".join(lines)


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: width - 3] + "..."
