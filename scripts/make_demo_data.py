"""Generate the synthetic demo instruction dataset (alpaca-format JSONL).

Each record is ``{"instruction": ..., "input": ..., "output": ...}``. The input
is 2-4 words drawn from a closed vocabulary (by default 8 of the 151 common
lowercase English words below), and the instruction is one of six fixed strings,
each naming a deterministic word-level transformation:

* ``Uppercase the words.``               -> ``input.upper()``
* ``Reverse the order of the words.``    -> words in reverse order
* ``Sort the words alphabetically.``     -> words sorted
* ``Repeat the first word three times.`` -> first word, three times
* ``Return the last word.``              -> last word
* ``Count the words.``                   -> number of words, as digits

Why this suits the ~3M-parameter built-in model on a CPU:

* Nothing needs world knowledge: every output is a function of the input words
  alone (a copy, permutation or case change of them, or a single digit).
* Records are short (about 19-27 tokens in the tiny model's ChatML), with 2-5
  supervised answer tokens each (``<|im_end|>`` included), so a step is cheap.
* Every word (and its uppercase) is one token of the tiny tokenizer.

Measured with ``lockstep train demo`` (300 steps of 32, lr 1e-3, cosine): the
loss falls from ~7.6 (uniform over the 2048-token vocabulary) to ~0.05 (eval
loss ~0.1), and greedy answers to the first 20 eval records of each task are
right for 20 of count, last word and repeat, 19 of uppercase, 15 of reverse
and 11 of sort.
With 24 words and 2-5-word inputs (``--n-words 24 --max-words 5``, the data
before), 400 steps of 16 learnt counting and little else; with all 151 words
the loss stalls near 4.

Train and eval are generated from different seeds derived from ``--seed``, and
eval samples that coincide exactly with a train sample are re-drawn, so the two
splits are disjoint.

The preference demo's pairs (demo_pairs.jsonl, demo_pairs_eval.jsonl) put the right answer
(chosen) beside a near miss (rejected: the last word not uppercased, the last two words of a
reversal or a sort swapped, repeated twice, the word before the last, one too many), in
alpaca's pairwise layout.

Usage::

    python scripts/make_demo_data.py [--seed 0] [--n-train 2000] [--n-eval 200]
                                     [--out-dir src/lockstep/examples/data] [--n-words 8]
                                     [--max-words 4]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS: tuple[str, ...] = (
    "apple", "bird", "blue", "boat", "book", "bread", "bright", "brown", "cake",
    "calm", "car", "cat", "chair", "city", "clean", "cloud", "cold", "cow",
    "cup", "dark", "day", "deep", "desk", "dog", "door", "dry", "duck", "early",
    "earth", "egg", "fast", "field", "fire", "fish", "flower", "fog", "forest",
    "fox", "friend", "frog", "garden", "gold", "grass", "green", "happy", "hat",
    "hill", "home", "horse", "hot", "house", "ice", "island", "jam", "key",
    "kind", "king", "lake", "lamp", "late", "leaf", "light", "lion", "long",
    "loud", "map", "milk", "moon", "morning", "mountain", "mouse", "music",
    "near", "new", "night", "north", "ocean", "old", "orange", "owl", "paper",
    "park", "pen", "pink", "plant", "queen", "quick", "quiet", "rain", "red",
    "river", "road", "rock", "rose", "round", "salt", "sand", "sea", "sheep",
    "ship", "shoe", "short", "silver", "sky", "slow", "small", "snow", "soft",
    "song", "south", "star", "stone", "storm", "street", "sugar", "summer",
    "sun", "sweet", "table", "tall", "tea", "tiger", "time", "train", "tree",
    "truck", "valley", "warm", "water", "west", "wet", "whale", "white", "wide",
    "wind", "window", "winter", "wolf", "wood", "world", "yellow", "young",
    "zebra", "bell", "coat", "corn", "drum", "gate", "kite", "nest", "pond",
)  # fmt: skip

MIN_WORDS = 2
MAX_WORDS = 4

TASKS: dict[str, Callable[[list[str]], str]] = {
    "Uppercase the words.": lambda ws: " ".join(ws).upper(),
    "Reverse the order of the words.": lambda ws: " ".join(reversed(ws)),
    "Sort the words alphabetically.": lambda ws: " ".join(sorted(ws)),
    "Repeat the first word three times.": lambda ws: " ".join([ws[0]] * 3),
    "Return the last word.": lambda ws: ws[-1],
    "Count the words.": lambda ws: str(len(ws)),
}


# Plausible wrong answers, for the preference pairs: the near misses of a model that has half
# learnt the task (one word left as it was, one neighbour pair swapped, off by one)
def _swap_last_two(ws: list[str]) -> list[str]:
    return [*ws[:-2], ws[-1], ws[-2]] if len(ws) >= 2 else ws


WRONG: dict[str, Callable[[list[str]], str]] = {
    "Uppercase the words.": lambda ws: " ".join([w.upper() for w in ws[:-1]] + ws[-1:]),
    "Reverse the order of the words.": lambda ws: " ".join(_swap_last_two(ws[::-1])),
    "Sort the words alphabetically.": lambda ws: " ".join(_swap_last_two(sorted(ws))),
    "Repeat the first word three times.": lambda ws: " ".join([ws[0]] * 2),  # twice
    "Return the last word.": lambda ws: ws[-2],  # the word before it
    "Count the words.": lambda ws: str(len(ws) + 1),  # one too many
}

# Offsets mixed into the user seed so the splits use different streams.
TRAIN_SEED_OFFSET = 1_000
EVAL_SEED_OFFSET = 2_000
PAIRS_TRAIN_SEED_OFFSET = 3_000
PAIRS_EVAL_SEED_OFFSET = 4_000

Record = dict[str, str]


def pick_words(n: int) -> tuple[str, ...]:
    """The vocabulary to draw from: all of ``WORDS`` (n <= 0) or ``n`` evenly spaced."""
    if n <= 0 or n >= len(WORDS):
        return WORDS
    return tuple(WORDS[i * len(WORDS) // n] for i in range(n))


def make_record(
    rng: random.Random,
    vocab: tuple[str, ...] = WORDS,
    max_words: int = MAX_WORDS,
    instruction: str | None = None,
) -> Record:
    """Draw one (instruction, input, output) sample; `instruction`: that task, not a drawn one."""
    instruction = instruction or rng.choice(list(TASKS))
    n_words = rng.randint(MIN_WORDS, max_words)
    words = [rng.choice(vocab) for _ in range(n_words)]
    return {
        "instruction": instruction,
        "input": " ".join(words),
        "output": TASKS[instruction](words),
    }


def make_split(
    rng: random.Random,
    n: int,
    vocab: tuple[str, ...] = WORDS,
    exclude: set[tuple[str, str]] | None = None,
    max_words: int = MAX_WORDS,
    cycle: bool = False,
) -> list[Record]:
    """Draw ``n`` records, re-drawing any whose (instruction, input) is excluded; `cycle`: the
    tasks in turn (the eval split: its first six records are one of each, for eval.show)."""
    exclude = exclude or set()
    records: list[Record] = []
    while len(records) < n:
        task = list(TASKS)[len(records) % len(TASKS)] if cycle else None
        rec = make_record(rng, vocab, max_words, task)
        if (rec["instruction"], rec["input"]) in exclude:
            continue
        records.append(rec)
    return records


def make_pairs(
    rng: random.Random, n: int, vocab: tuple[str, ...], max_words: int,
    exclude: set[tuple[str, str]] | None = None,
) -> list[Record]:  # fmt: skip
    """``n`` preference pairs in alpaca's pairwise layout (instruction, input, chosen,
    rejected): chosen is the task's answer, rejected the WRONG one. Inputs whose wrong answer
    happens to be right (a sorted input, a palindrome) are drawn again; the tasks take turns."""
    exclude = exclude or set()
    pairs: list[Record] = []
    while len(pairs) < n:
        task = list(TASKS)[len(pairs) % len(TASKS)]
        rec = make_record(rng, vocab, max_words, task)
        words = rec["input"].split()
        wrong = WRONG[task](words)
        if wrong == rec["output"] or (task, rec["input"]) in exclude:
            continue
        pairs.append({"instruction": task, "input": rec["input"], "chosen": rec["output"],
                      "rejected": wrong})  # fmt: skip
    return pairs


def write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--out-dir", type=Path, default=Path("src/lockstep/examples/data"))
    parser.add_argument(
        "--n-words",
        type=int,
        default=8,
        help=f"use only this many (evenly spaced) of the {len(WORDS)} words; 0 = all "
        "(8: what the tiny model learns in a few hundred steps)",
    )
    parser.add_argument("--max-words", type=int, default=MAX_WORDS, help="words per input, at most")
    parser.add_argument("--n-pairs", type=int, default=1200, help="preference pairs to train on")
    parser.add_argument("--n-pairs-eval", type=int, default=120, help="held-out pairs")
    args = parser.parse_args(argv)

    vocab = pick_words(args.n_words)
    train = make_split(
        random.Random(args.seed + TRAIN_SEED_OFFSET), args.n_train, vocab, max_words=args.max_words
    )
    seen = {(r["instruction"], r["input"]) for r in train}
    evals = make_split(
        random.Random(args.seed + EVAL_SEED_OFFSET),
        args.n_eval,
        vocab,
        exclude=seen,
        max_words=args.max_words,
        cycle=True,
    )

    pairs = make_pairs(
        random.Random(args.seed + PAIRS_TRAIN_SEED_OFFSET), args.n_pairs, vocab, args.max_words
    )
    pair_eval = make_pairs(
        random.Random(args.seed + PAIRS_EVAL_SEED_OFFSET), args.n_pairs_eval, vocab,
        args.max_words, exclude={(r["instruction"], r["input"]) for r in pairs},
    )  # fmt: skip
    for name, records in (("demo_pairs.jsonl", pairs), ("demo_pairs_eval.jsonl", pair_eval)):
        write_jsonl(args.out_dir / name, records)
        print(f"wrote {len(records)} preference pairs to {args.out_dir / name}")

    train_path = args.out_dir / "demo_train.jsonl"
    eval_path = args.out_dir / "demo_eval.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(eval_path, evals)
    print(f"wrote {len(train)} records to {train_path}")
    print(f"wrote {len(evals)} records to {eval_path}")


if __name__ == "__main__":
    main()
