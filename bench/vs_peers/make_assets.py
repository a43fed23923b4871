"""The shared inputs of the peer benchmark: one model folder and one alpaca dataset.

    .venv/bin/python bench/vs_peers/make_assets.py --out bench/vs_peers/work/assets [--seed 0]
                                                   [--fixture small|realistic]

Runs in lockstep's venv (torch + transformers) and writes, under --out:

* ``model/``: a Llama-architecture model with random weights drawn from --seed, written by
  ``save_pretrained`` (safetensors, float32), plus the tokenizer. Every tool loads this same
  folder (lockstep: ``model.path: <folder>``).
* ``data/train.jsonl``: --records alpaca records (``instruction``, ``input``, ``output``) from a
  seeded generator, and ``data/dataset_info.json`` naming it for LLaMA-Factory;
* ``data/train-ordered.jsonl``: the same records in the order lockstep trains on them with
  --seed (its first epoch's permutation, data/order.py). The peers read it sequentially in the
  cases without packing, so every tool trains the same records at every step (``bench_ordered``
  in dataset_info.json);
* ``data/pairs.jsonl``: --pairs answer pairs in LLaMA-Factory's alpaca pairwise layout
  (``instruction``, ``input``, ``chosen``, ``rejected``) for the preference benchmark
  (``dpo.py``): the same tasks over 16-240 words (each row ~50-500 tokens), chosen = the right transformation of the words, rejected = another
  task's transformation of the same words (plausible, wrong, and of another length). Both rows of
  a pair (prompt + answer) fit in --max-tokens. ``data/check.jsonl`` holds the first --check-pairs
  of them: one global batch, for the first-step agreement check.

The tokenizer is lockstep's built-in one (``src/lockstep/model/builtin/tiny``: byte-level BPE,
2,048 tokens, ChatML), copied as is, with one change to its chat template: the newline after
``<|im_end|>`` is moved inside the ``{% generation %}`` block. LLaMA-Factory's ``chatml``
template trains on ``{output}<|im_end|>\\n``; with the newline inside the markers, lockstep
(which masks by the markers) and TRL (``assistant_only_loss``, also by the markers) train on
exactly the same tokens. The rendered text is unchanged.

Every record has ``input: ""``: the words to work on are in the instruction, after a blank line.
lockstep joins instruction and input with a blank line and LLaMA-Factory with a single newline,
so a non-empty input would give the tools different prompts.

The data is a set of word-level tasks (the demo task's idea, ``scripts/make_demo_data.py``) over
2-100 words drawn log-uniformly, so records range from about 20 to 450 tokens and a batch
padded to its longest sample is mostly padding: padding and packing matter. Records longer than
--max-tokens (ChatML, tokenizer above) are re-drawn, so no tool truncates or drops any sample.
The same --seed always gives the same files.

Two fixtures (--fixture), each in its own --out folder:

* ``small`` (the default; the numbers in bench/RESULTS.md before issue 18): the model above,
  about 10M parameters (6 blocks of 384, GQA 6/2 heads, tied embeddings, vocabulary 2,048), and
  records of 2-100 words (about 20-450 tokens, median ~46).
* ``realistic``: lengths like real chat data (alpaca-gpt4 / ShareGPT) and a model shaped like a
  scaled-down Llama-3 / Qwen2.5. Word counts are log-normal (median 58 words, sigma 0.8), so a
  record is ~135 tokens at the median, with a long tail to ~2,000 tokens (records over
  --max-tokens, 2,000 by default here, are re-drawn; the measured median / p90 / max are in
  assets.json). The model: 8 blocks of 512, SiLU MLP of 1,536, GQA (8 query heads, 2 key/value
  heads of 64), RoPE (theta 500,000), untied embeddings and LM head, a vocabulary of 32,768
  rows: about 58M parameters, 24M of them outside the embedding and the LM head. The tokenizer
  is the same 2,048-token one (the word tasks use a few hundred distinct words, too few to train
  a real 32k BPE on); the rows past 2,048 are never produced as input but the LM head and the
  softmax compute all 32,768 logits of every position they run on, so a token costs exactly
  what it costs with a 32k vocabulary (real models pad their vocabularies too). The tokenizer's
  ``model_max_length`` is raised to 4,096 so no tool warns about or cuts the 2,000-token
  records.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "src" / "lockstep" / "model" / "builtin" / "tiny"
sys.path.insert(0, str(ROOT / "scripts"))

from make_demo_data import WORDS  # noqa: E402

ASSETS_VERSION = 4  # bump when the generator or the model changes

# ChatML, as in lockstep's built-in template, with the newline after <|im_end|> trained (see above)
CHAT_TEMPLATE = """\
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

MODEL = {  # ~10M parameters: 6 blocks of 384, grouped-query attention, tied embeddings
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}

MODEL_REALISTIC = {  # ~58M parameters: a scaled-down Llama-3 / Qwen2.5 (see the docstring)
    "vocab_size": 32768,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

REALISTIC_WORDS = (58, 0.8)  # log-normal word count: median, sigma (~135 tokens at the median)

FIXTURES = {  # name: (model, default --max-tokens)
    "small": (MODEL, 500),
    "realistic": (MODEL_REALISTIC, 2000),
}


def _numbered(ws: list[str]) -> str:
    return "\n".join(f"{i}. {w}" for i, w in enumerate(ws, 1))


TASKS = {
    "Uppercase the words.": lambda ws: " ".join(ws).upper(),
    "Reverse the order of the words.": lambda ws: " ".join(reversed(ws)),
    "Sort the words alphabetically.": lambda ws: " ".join(sorted(ws)),
    "Repeat every word twice.": lambda ws: " ".join(w for w in ws for _ in range(2)),
    "Number the words, one per line.": _numbered,
    "Return every second word.": lambda ws: " ".join(ws[1::2]) or ws[0],
    "Return the last word.": lambda ws: ws[-1],
    "Count the words.": lambda ws: str(len(ws)),
}


def make_record(
    rng: random.Random, words_range: tuple[int, int] = (2, 100), lognormal: bool = False
) -> dict[str, str]:
    """One word task. The word count is log-uniform over words_range, or, with lognormal,
    log-normal with REALISTIC_WORDS' median and sigma (at least 1 word)."""
    task = rng.choice(list(TASKS))
    if lognormal:
        median, sigma = REALISTIC_WORDS
        n = max(1, round(rng.lognormvariate(math.log(median), sigma)))
    else:
        n = round(math.exp(rng.uniform(*map(math.log, words_range))))
    words = [rng.choice(WORDS) for _ in range(n)]
    return {
        "instruction": f"{task}\n\n{' '.join(words)}",
        "input": "",
        "output": TASKS[task](words),
    }


def chatml_ids(tok, rec: dict[str, str]) -> list[int]:
    messages = [
        {"role": "user", "content": rec["instruction"]},
        {"role": "assistant", "content": rec["output"]},
    ]
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def make_data(
    tok, n: int, seed: int, max_tokens: int, lognormal: bool = False
) -> tuple[list[dict], list[int]]:
    rng = random.Random(seed)
    records, lengths = [], []
    while len(records) < n:
        rec = make_record(rng, lognormal=lognormal)
        length = len(chatml_ids(tok, rec))
        if length <= max_tokens:
            records.append(rec)
            lengths.append(length)
    return records, lengths


PAIR_WORDS = (16, 240)  # rows of ~50-500 tokens, median ~150: preference data's longer answers


def make_pairs(tok, n: int, seed: int, max_tokens: int) -> tuple[list[dict], list[int]]:
    """n answer pairs; their lengths are each pair's two rows together, in tokens."""
    rng = random.Random(f"pairs-{seed}")
    pairs, lengths = [], []
    while len(pairs) < n:
        rec = make_record(rng, PAIR_WORDS)
        task, words = rec["instruction"].split("\n\n")
        wrong = rng.choice([t for t in TASKS if TASKS[t](words.split()) != rec["output"]] or [None])
        if wrong is None:
            continue
        pair = {
            "instruction": rec["instruction"],
            "input": "",
            "chosen": rec["output"],
            "rejected": TASKS[wrong](words.split()),
        }
        rows = [len(chatml_ids(tok, {**rec, "output": pair[k]})) for k in ("chosen", "rejected")]
        if max(rows) <= max_tokens:
            pairs.append(pair)
            lengths.append(sum(rows))
    return pairs, lengths


def in_lockstep_order(records: list[dict], seed: int) -> list[dict]:
    """The records in the order lockstep trains on them with this seed (its first epoch:
    data/order.py's permutation; record i is lockstep's sample i). A peer that reads this file
    sequentially trains step k on lockstep's global batch k."""
    from lockstep.data.order import permutation

    return [records[int(i)] for i in permutation(seed, 0, len(records))]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _summary(lengths: list[int]) -> dict:
    lengths = sorted(lengths)
    return {
        "tokens": sum(lengths),
        "length_p50": lengths[len(lengths) // 2],
        "length_p90": lengths[len(lengths) * 9 // 10],
        "length_max": lengths[-1],
        # sum(n^2) / sum(n): the mean, over tokens, of the length of the sample a token is in
        # (what each token attends over; run.py's attention FLOPs)
        "attention_span": round(sum(n * n for n in lengths) / max(1, sum(lengths)), 1),
    }


def make_model(tok, seed: int, out: Path, shape: dict = MODEL) -> int:
    """A Llama of the given shape (vocab_size defaults to the tokenizer's), random weights from
    seed, saved to out; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{"vocab_size": len(tok), **shape},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--pairs", type=int, default=320, help="answer pairs to generate")
    p.add_argument("--check-pairs", type=int, default=16, help="pairs in data/check.jsonl")
    p.add_argument("--max-tokens", type=int, help="longest record, in tokens (small: 500, "
                   "realistic: 2000)")  # fmt: skip
    p.add_argument("--fixture", choices=list(FIXTURES), default="small")
    args = p.parse_args(argv)
    shape, default_max = FIXTURES[args.fixture]
    if args.max_tokens is None:
        args.max_tokens = default_max

    from transformers import AutoTokenizer

    stamp = {
        "version": ASSETS_VERSION,
        "seed": args.seed,
        "records": args.records,
        "pairs": args.pairs,
        "check_pairs": args.check_pairs,
        "max_tokens": args.max_tokens,
        "model": shape,
        **(
            {"fixture": args.fixture, "words": list(REALISTIC_WORDS)}
            if args.fixture != "small"
            else {}
        ),
    }
    done = args.out / "assets.json"
    if done.is_file() and json.loads(done.read_text()).get("stamp") == stamp:
        print(f"assets: reusing {args.out}")
        return
    shutil.rmtree(args.out / "model", ignore_errors=True)
    shutil.rmtree(args.out / "data", ignore_errors=True)
    model_dir, data_dir = args.out / "model", args.out / "data"
    model_dir.mkdir(parents=True)
    data_dir.mkdir(parents=True)

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, model_dir / name)
    if args.fixture == "realistic":
        tok_cfg = model_dir / "tokenizer_config.json"
        tok_cfg.write_text(
            json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": 4096}, indent=2)
        )
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = make_model(tok, args.seed, model_dir, shape)

    records, lengths = make_data(
        tok, args.records, args.seed, args.max_tokens, lognormal=args.fixture == "realistic"
    )
    write_jsonl(data_dir / "train.jsonl", records)
    write_jsonl(data_dir / "train-ordered.jsonl", in_lockstep_order(records, args.seed))
    pairs, pair_lengths = make_pairs(tok, args.pairs, args.seed, args.max_tokens)
    write_jsonl(data_dir / "pairs.jsonl", pairs)
    write_jsonl(data_dir / "check.jsonl", pairs[: args.check_pairs])
    pair_columns = {"prompt": "instruction", "query": "input", "chosen": "chosen",
                    "rejected": "rejected"}  # fmt: skip
    sft_columns = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {
        "bench": {"file_name": "train.jsonl", "formatting": "alpaca", "columns": sft_columns},
        "bench_ordered": {
            "file_name": "train-ordered.jsonl",
            "formatting": "alpaca",
            "columns": sft_columns,
        },
        **{
            f"bench_{name}": {
                "file_name": f"{name}.jsonl",
                "formatting": "alpaca",
                "ranking": True,
                "columns": pair_columns,
            }
            for name in ("pairs", "check")
        },
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))

    summary = {
        "fixture": args.fixture,
        "parameters": params,
        "model": {**shape, "vocab_size": shape.get("vocab_size", len(tok))},
        "tokenizer_size": len(tok),
        "records": len(records),
        **_summary(lengths),
    }
    summary["pairs"] = {"pairs": len(pairs), **_summary(pair_lengths)}
    done.write_text(json.dumps({"stamp": stamp, "summary": summary}, indent=2))
    print(
        f"assets ({args.fixture}): {params / 1e6:.1f}M-parameter model, {len(records)} records "
        f"(tokens per record: median {summary['length_p50']}, p90 {summary['length_p90']}, "
        f"max {summary['length_max']}), {len(pairs)} answer pairs (tokens per pair, both rows: "
        f"median {summary['pairs']['length_p50']}, max {summary['pairs']['length_max']}) in "
        f"{args.out}"
    )


if __name__ == "__main__":
    main()
