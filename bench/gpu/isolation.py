"""Packing's logits-isolation check: a packed 2-row micro-batch gives every sample the logits it
gets alone.

    python bench/gpu/isolation.py CONFIG [key=value ...] [--json PATH]

The model is built as `lockstep train CONFIG` builds it (training/build.build_model with samples
sharing rows, so model.attn_implementation=auto picks what a packed run gets, then
training/parallel.prepare), and it runs through the same module and precision the training step
uses. Five samples of random tokens are packed into 2 rows by data/packing.pack and collated by
data/collate.collate; each sample is also collated and run alone. The logits are the LM head
applied to the decoder's output, caught with a forward hook, so the check sees whatever inputs
lockstep gives the model. Verdict, per attention implementation: the largest logit difference
between packed and alone, divided by the largest logit, is at most TOLERANCE (bfloat16
rounding); and the same rows given an all-ones attention mask (samples see each other) differ by
more than that, which shows the check can see a leak at all.

Tried: the implementation lockstep picks, then sdpa and flex_attention (and flash_attention_2
when flash-attn is installed) on CUDA; on a CPU only the first and sdpa.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

TOLERANCE = 0.05  # of the largest logit: bf16 rounding gave under 0.01, a leak about 1
SHARES = (0.49, 0.39, 0.29, 0.24, 0.19)  # of max_length: best-fit packs them as 2 + 3 in 2 rows


def samples_of(lengths: list[int], vocab: int, seed: int = 0):
    """Samples of random tokens (all of them trained), unpacked."""
    from lockstep.data.dataset import Samples

    rng = np.random.default_rng(seed)
    ids = [rng.integers(4, vocab, size=n, dtype=np.int64) for n in lengths]
    return Samples(ids, [x.copy() for x in ids], "isolation-check")


def logits_of(engine: torch.nn.Module, batch: dict, cfg, d) -> torch.Tensor:
    """The logits of every position of `batch`, run through lockstep's training module."""
    from lockstep.model.adapters import causal_lm
    from lockstep.model.attention import to_device
    from lockstep.training import parallel

    causal = causal_lm(engine.model)
    caught: list[torch.Tensor] = []
    hook = causal.get_decoder().register_forward_hook(lambda _m, _a, out: caught.append(out[0]))
    try:
        with torch.no_grad(), parallel.autocast(cfg, d):
            engine(to_device(batch, d.device))
            return causal.get_output_embeddings()(caught[-1]).float()
    finally:
        hook.remove()


def compare(engine: torch.nn.Module, cfg, d, pad_id: int, vocab: int, varlen: bool) -> dict:
    """Packed vs alone for one built model: the largest differences, and the leak reference."""
    from lockstep.data.collate import collate
    from lockstep.data.packing import assign, pack

    lengths = [max(2, int(s * cfg.data.max_length)) for s in SHARES]
    samples = samples_of(lengths, vocab)
    groups = assign(lengths, cfg.data.max_length)  # the rows pack() builds, in its order
    if len(groups) < 2 or min(len(g) for g in groups) < 2:
        raise RuntimeError(f"expected 2+ rows of 2+ samples, packing gave {groups}")
    batch = collate(
        pack(samples, cfg.data.max_length), np.arange(len(groups)), pad_id, varlen=varlen
    )
    packed = logits_of(engine, batch, cfg, d)
    plain = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    leaky = dict(plain, attention_mask=torch.ones_like(batch["input_ids"]))
    leaked = logits_of(engine, leaky, cfg, d)
    diff = leak = top = 0.0
    for row, group in enumerate(groups):
        at = 0
        for i in group:
            alone = logits_of(engine, collate(samples, np.array([i]), pad_id), cfg, d)[0]
            n = lengths[i]
            top = max(top, alone.abs().max().item())
            diff = max(diff, (packed[row, at : at + n] - alone).abs().max().item())
            leak = max(leak, (leaked[row, at : at + n] - alone).abs().max().item())
            at += n
    return {
        "rows": [[lengths[i] for i in g] for g in groups],
        "max_abs_logit": top,
        "max_abs_diff": diff,
        "rel_diff": diff / max(top, 1e-12),
        "leak_rel_diff": leak / max(top, 1e-12),
    }


def implementations(cfg, device: torch.device) -> list[str]:
    """lockstep's choice for packed rows first, then the others worth trying on this device."""
    from importlib.util import find_spec

    from lockstep.model import attention

    auto = attention.choose(cfg.model, device, True, attention.model_support(cfg.model))
    chosen = [auto.name or "sdpa", "sdpa"]
    if device.type == "cuda":
        chosen.append("flex_attention")
        if find_spec("flash_attn"):
            chosen.append("flash_attention_2")
    return list(dict.fromkeys(chosen))


def check(cfg, report: Path | None = None) -> dict:
    """Run the comparison for every implementation; the result (also written to `report` after
    each implementation, so a run stopped by its time limit keeps what it found)."""
    from lockstep import dist
    from lockstep.model import attention
    from lockstep.model.adapters import causal_lm
    from lockstep.model.load import load_tokenizer
    from lockstep.training import build, parallel
    from lockstep.training.objective import objective

    d = dist.setup()
    tok = load_tokenizer(cfg.model)
    result: dict = {"ok": True, "tolerance": TOLERANCE, "implementations": {}}
    for k, name in enumerate(implementations(cfg, d.device)):
        run_cfg = cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"attn_implementation": name})}
        )
        entry: dict = {"lockstep_choice": k == 0}
        try:
            choice = attention.Choice(name, "checked by bench/gpu/isolation.py")
            model = build.build_model(run_cfg, cfg.seed or 0, d, choice)
            engine = parallel.prepare(run_cfg, d, model, objective(run_cfg))
            vocab = min(len(tok), causal_lm(model).get_input_embeddings().num_embeddings)
            entry.update(compare(engine, run_cfg, d, tok.pad_token_id, vocab, choice.varlen))
            entry["ok"] = entry["rel_diff"] <= TOLERANCE < entry["leak_rel_diff"]
            if entry["leak_rel_diff"] <= TOLERANCE:
                entry["why"] = "an all-ones mask (a leak) changed nothing: the check is blind"
            elif not entry["ok"]:
                entry["why"] = "packed samples do not get their logits alone: attention leaks"
        except Exception as e:  # a kernel this machine lacks is a finding, not a crash
            entry.update(ok=False, why=f"{type(e).__name__}: {str(e).strip()[:300]}")
        result["implementations"][name] = entry
        result["ok"] = result["ok"] and entry["ok"]
        if report is not None:
            report.write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--json", type=Path, default=None, help="write the result here too")
    args = ap.parse_args()
    from lockstep import config

    result = check(config.load(args.config, args.overrides), args.json)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
