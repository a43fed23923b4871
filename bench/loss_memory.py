"""Peak memory of one training step: lockstep's chunked loss vs the plain loss over full logits.

    .venv/bin/python bench/loss_memory.py [--vocab 128256] [--tokens 4096] [--chunk 1024]

A small Llama body (hidden 512, 2 blocks) with a large vocabulary, one micro-batch of `tokens`
tokens of which 75% are targets, forward + backward. Each variant runs in its own process; the
peak is that process's peak RSS (CPU) or torch.cuda.max_memory_allocated (CUDA), minus what it
held before the step. Prints a table and writes bench/loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, resource, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lockstep.training.loss import CausalLMLoss
vocab, tokens, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) or None
dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                  tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(dev)
ids = torch.randint(0, vocab, (1, tokens), device=dev)
labels = ids.roll(-1, 1).clone()
labels[:, : tokens // 4] = -100
loss_fn = CausalLMLoss(model, chunk)
def peak():
    if dev == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loss_fn({"input_ids": ids[:, :64], "labels": labels[:, :64]}).backward()  # warm-up, small
model.zero_grad(set_to_none=False)
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated() if dev == "cuda" else peak()
t0 = time.perf_counter()
loss = loss_fn({"input_ids": ids, "labels": labels})
loss.backward()
if dev == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"peak_extra_bytes": peak() - before, "seconds": time.perf_counter() - t0,
                  "loss": loss.item(), "device": dev}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    rows = []
    for name, chunk in (("plain (full logits)", 0), (f"chunked ({args.chunk})", args.chunk)):
        res = subprocess.run(
            [sys.executable, "-c", STEP, str(args.vocab), str(args.tokens), str(chunk)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append({"loss_path": name, **json.loads(res.stdout.strip().splitlines()[-1])})
    logits = args.tokens * args.vocab * 4
    print(f"vocab {args.vocab}, {args.tokens} tokens: float32 logits alone are "
          f"{logits / 2**30:.2f} GiB")  # fmt: skip
    print(f"{'loss':<22}{'peak extra MiB':>16}{'step s':>9}{'loss':>12}")
    for r in rows:
        print(f"{r['loss_path']:<22}{r['peak_extra_bytes'] / 2**20:>16,.0f}{r['seconds']:>9.2f}"
              f"{r['loss']:>12.2f}")  # fmt: skip
    ratio = rows[0]["peak_extra_bytes"] / max(rows[1]["peak_extra_bytes"], 1)
    print(f"chunked uses {ratio:.1f}x less extra memory")
    out = {"vocab": args.vocab, "tokens": args.tokens, "rows": rows}
    Path(__file__).with_name("loss_memory.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
