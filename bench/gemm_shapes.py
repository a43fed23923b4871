"""How fast the realistic model's matrix products run at the micro-batch shapes each tool makes.

    .venv/bin/python bench/gemm_shapes.py [--micro 2] [--global 4] [--steps 200]

On the realistic bench/vs_peers fixture (its records' token lengths and its model's projection
shapes; run `python3 bench/vs_peers/run.py --fixture realistic --setup-only` first), the global
batches of --global records are cut into micro-batches of --micro records two ways:

* lockstep: the global batch sorted by length, each micro-batch one padding-free row
  (M = the sum of its records' lengths);
* padded rectangles (TRL, LLaMA-Factory): records in shuffled order, each micro-batch padded to
  its longest record (M = micro x that length).

For every distinct M of --steps global batches, the forward and backward products of every block
projection (x W^T, the input gradient, the weight gradient) are timed in float32 on the machine's
default threads. Reported per scheme: GFLOP/s of the products over all rows, the share of rows
that are padding, and GFLOP/s over real tokens only (what the trained tokens get). Also the
products of one packed row of --packed tokens (the packing cases' micro-batch): the rate the
blocks' matrix products reach at that shape, the ceiling of a packed step's model FLOP/s. The
matmul peak of bench/vs_peers/matmul_peak.py is the reference.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "vs_peers" / "work" / "assets-realistic"
sys.path.insert(0, str(HERE / "vs_peers"))


def record_lengths() -> list[int]:
    """Token lengths of the fixture's records, as every tool tokenises them (ChatML)."""
    from make_assets import chatml_ids  # bench/vs_peers

    from lockstep.config import ModelConfig
    from lockstep.model.load import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    lines = (ASSETS / "data" / "train.jsonl").read_text().splitlines()
    return [len(chatml_ids(tok, json.loads(line))) for line in lines]


def micro_shapes(lengths: list[int], micro: int, size: int, steps: int, seed: int = 0):
    """(lockstep's rows, the padded rectangles' rows, real tokens) over `steps` global batches."""
    rng = random.Random(seed)
    lock, padded, real = [], [], 0
    for _ in range(steps):
        batch = rng.sample(lengths, size)
        real += sum(batch)
        ordered = sorted(batch, reverse=True)
        for i in range(0, size, micro):
            lock.append(sum(ordered[i : i + micro]))
            group = batch[i : i + micro]
            padded.append(len(group) * max(group))
    return lock, padded, real


def product_seconds(m: int, projections: list[tuple[int, int]], repeats: int = 3) -> float:
    """Seconds of the forward and both backward products of every projection, M rows."""
    xs = {i: torch.randn(m, i) for i, _ in projections}
    ws = [torch.randn(o, i) for i, o in projections]
    gs = {o: torch.randn(m, o) for _, o in projections}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in ws:
            o, i = w.shape
            xs[i] @ w.T, gs[o] @ w, gs[o].T @ xs[i]  # noqa: B018
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--global", dest="size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--packed", type=int, default=2048, help="tokens of a packed row")
    args = ap.parse_args()
    shape = json.loads((ASSETS / "model" / "config.json").read_text())
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    projections = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    flops_per_row = 6 * sum(i * o for i, o in projections)
    lock, padded, real = micro_shapes(record_lengths(), args.micro, args.size, args.steps)
    seconds = {m: product_seconds(m, projections) for m in sorted({*lock, *padded})}
    print(f"{len(seconds)} shapes, {torch.get_num_threads()} threads; real tokens {real:,}")
    result = {}
    for name, rows in (("lockstep (sorted, padding-free)", lock), ("padded rectangles", padded)):
        s = sum(seconds[m] for m in rows)
        result[name] = {
            "rows": sum(rows),
            "padding_share": round(1 - real / sum(rows), 4),
            "median_m": statistics.median(rows),
            "gflops_all_rows": round(flops_per_row * sum(rows) / s / 1e9, 1),
            "gflops_real_tokens": round(flops_per_row * real / s / 1e9, 1),
            "seconds": round(s, 3),
        }
        r = result[name]
        print(f"{name:32s} M median {r['median_m']:>6,.0f}  padding {r['padding_share']:6.1%}  "
              f"{r['gflops_all_rows']:6.1f} GFLOP/s over all rows, "
              f"{r['gflops_real_tokens']:6.1f} over real tokens  ({r['seconds']:.2f} s)")  # fmt: skip
    packed = flops_per_row * args.packed / product_seconds(args.packed, projections) / 1e9
    result["packed row"] = {"m": args.packed, "gflops": round(packed, 1)}
    print(f"{'one packed row':32s} M {args.packed:>6,}  {packed:6.1f} GFLOP/s")
    (HERE / "gemm_shapes.json").write_text(json.dumps({"args": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main()
