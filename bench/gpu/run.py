"""lockstep on one CUDA GPU: a ~1B-parameter Llama-shaped model, 4096-token packed sequences, bf16.

    .venv/bin/python bench/gpu/run.py [--steps 30] [--peer-python PATH]

Reports tokens/s/GPU, peak GPU memory and MFU for lockstep, and for TRL's SFTTrainer under the
same settings when a Python with trl is given (--peer-python, or trl importable here); prints a
table and writes bench/gpu/results.json.

Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab
128256, tied embeddings), random weights, saved in bfloat16. Data: generated alpaca records of
100-1500 tokens (the built-in tokenizer), packed into 4096-token rows; global batch 16 rows,
micro-batch 2 (accumulation 8), full fine-tuning, AdamW, bf16 compute with float32 master weights.

MFU = (model FLOPs per token x tokens/s) / peak bf16 FLOP/s of the GPU (dense, no sparsity:
H100/H200 SXM 989.4 TFLOP/s, A100 312). FLOPs per trained token = 6 N + 6 L d S, with N the
parameters of the matmuls a token goes through (blocks + LM head; not the input embedding),
L layers, d the hidden size, and S the mean length of the samples attention runs over (packed
samples attend only within themselves; 6 L d S is causal attention's forward+backward: half
of the 12 L d S that non-causal attention costs). Tokens/s counts every token of the rows, so
it is the same definition for every tool.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = HERE / "work"
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
             max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0)  # fmt: skip
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}
SEQ, GLOBAL, MICRO = 4096, 16, 2


def build_assets() -> tuple[Path, Path, float]:
    """The model folder, the data file, and the mean tokens per sample."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, data = WORK / "llama-1b", WORK / "alpaca.jsonl"
    tok = AutoTokenizer.from_pretrained(ROOT / "src/lockstep/model/builtin/tiny")
    if not (model_dir / "config.json").exists():
        cfg = LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)  # fmt: skip
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    if not data.exists():
        words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) > 2)
        rng = random.Random(0)
        with data.open("w") as f:
            for _ in range(6000):
                n = rng.randint(60, 1200)
                f.write(json.dumps({"instruction": "Continue the text.",
                                    "input": " ".join(rng.choices(words, k=40)),
                                    "output": " ".join(rng.choices(words, k=n))}) + "\n")  # fmt: skip
    sample = [json.loads(x) for x in data.read_text().splitlines()[:300]]
    lens = [len(tok(" ".join(r.values()))["input_ids"]) for r in sample]
    return model_dir, data, min(sum(lens) / len(lens), SEQ)


def run_lockstep(model_dir: Path, data: Path, steps: int) -> dict:
    out = WORK / "lockstep-run"
    cmd = [sys.executable, "-m", "lockstep", "train", str(HERE / "lockstep.yaml"),
           f"output_dir={out}", f"model.path={model_dir}", f"data.train.0.path={data}",
           f"train.max_steps={steps}", "checkpoint.resume=never", "checkpoint.overwrite=true"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    timed = rows[len(rows) // 3 :]  # after compilation and warm-up
    seconds = timed[-1]["elapsed_s"] - rows[len(rows) // 3 - 1]["elapsed_s"]
    tokens = sum(r["tokens"] for r in timed)
    return {"tool": "lockstep", "tokens_per_s": tokens / seconds, "wall_s": wall,
            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows),
            "final_loss": rows[-1]["loss"]}  # fmt: skip


def run_trl(python: str, model_dir: Path, data: Path, steps: int) -> dict:
    out = WORK / "trl-run.json"
    subprocess.run([python, str(HERE / "trl_gpu.py"), str(model_dir), str(data), str(steps),
                    str(SEQ), str(MICRO), str(GLOBAL // MICRO), str(out)], check=True)  # fmt: skip
    return {"tool": "trl", **json.loads(out.read_text())}


def flops_per_token(mean_len: float) -> float:
    d, L, f, v = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["intermediate_size"], \
        SHAPE["vocab_size"]  # fmt: skip
    kv = d * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    block = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o, k, v, gate/up/down
    n = L * block + d * v  # + the LM head
    return 6 * n + 6 * L * d * mean_len


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peer-python", default=None, help="a Python with trl installed")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    WORK.mkdir(exist_ok=True)
    model_dir, data, mean_len = build_assets()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    fpt = flops_per_token(mean_len)
    results = [run_lockstep(model_dir, data, args.steps)]
    peer = args.peer_python or (sys.executable if _has_trl() else None)
    if peer:
        results.append(run_trl(peer, model_dir, data, args.steps))
    print(f"{name}; model FLOPs/token {fpt / 1e9:.2f} GFLOP; bf16 peak {peak} TFLOP/s")
    print(f"{'tool':<10}{'tokens/s/GPU':>14}{'peak GiB':>10}{'MFU':>8}{'loss':>8}")
    for r in results:
        r["mfu"] = fpt * r["tokens_per_s"] / (peak * 1e12) if peak else None
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['tool']:<10}{r['tokens_per_s']:>14,.0f}{r['peak_mem_gib']:>10.1f}{mfu:>8}"
              f"{r['final_loss']:>8.3f}")  # fmt: skip
    if len(results) == 2:
        print(
            f"lockstep / trl tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x"
        )
    (HERE / "results.json").write_text(json.dumps({"gpu": name, "flops_per_token": fpt,
                                                   "results": results}, indent=2))  # fmt: skip
    return 0


def _has_trl() -> bool:
    from importlib.util import find_spec

    return find_spec("trl") is not None


if __name__ == "__main__":
    sys.exit(main())
