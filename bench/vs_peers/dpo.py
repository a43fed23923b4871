"""lockstep vs TRL (DPOTrainer) vs LLaMA-Factory (stage: dpo): preference training on the CPU.

    python3 bench/vs_peers/dpo.py [--steps 20] [--repeats 3] [--cases full lora]
                                  [--tools lockstep trl llamafactory] [--skip-check]

The environments and the model are run.py's (the same venvs, the same ~10M-parameter Llama
folder); the data is make_assets.py's answer pairs (alpaca pairwise: an instruction, a chosen
and a rejected answer; each row ~50-500 tokens). Every tool gets the same pairs, micro-batch
(--micro pairs), accumulation (--accum), max length, learning rate (cosine, no warmup, no weight
decay, clipping 1.0), seed, float32, sdpa attention, no gradient checkpointing, 0 dataloader
workers; DPO's sigmoid loss with beta --beta; LoRA r/alpha on every linear layer of the blocks.
Each tool uses its own reference: lockstep its default (`preference.reference: auto`: with full
fine-tuning the starting model's log-probabilities, computed in one pass before training; with
LoRA the model with its adapters off), TRL and LLaMA-Factory theirs (a frozen copy of the model
with full fine-tuning, computed at every step; the adapters off with LoRA).

Two parts, in one run:

1. **The first steps agree** (the correctness check): every tool trains 2 steps on the same 16
   pairs (data/check.jsonl: exactly one global batch, so every step covers the same pairs in
   every tool, whatever its shuffling). Compared with lockstep, for DPO (full and LoRA, all
   three tools): the step-1 loss (ln 2: the policy is the reference), the mean summed
   log-probabilities of the chosen and rejected answers at step 1 (the same tokens, masks and
   model: this is where a tokenisation or masking difference shows), and the step-2 loss (after
   one AdamW step: gradients, clipping and the optimizer agree; with LoRA it is shown, not
   judged, as each tool draws the adapters' A matrices from its own random stream). For SimPO and ORPO
   (reference-free: a step-1 loss that is not a constant), lockstep and LLaMA-Factory, whose
   definitions agree (TRL 1.16's DPOTrainer has neither): the step-1 loss. Every judged value
   must agree within 1e-4 (absolute).
2. **Speed**: every case with every tool, --repeats rounds, alternating, over data/pairs.jsonl
   (--steps x global batch pairs: one epoch). Trained pairs per second = pairs / training
   seconds, where the training seconds are lockstep's ``elapsed_s`` at its last step plus its
   reference pass (the time its log reports; 0 when none ran) and, for the peers, the time from
   the Trainer's on_train_begin to its last optimizer step (hf_probe.py). Pairs are counted on
   the micro-batches really trained (rows / 2). Also wall s (the whole process) and peak RSS.

Writes --out (JSON, every run) and prints both tables; bench/RESULTS.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    ENV,
    HERE,
    LOCKSTEP_PY,
    TOOLS,
    WORK,
    ensure_lockstep,
    ensure_peer,
    fresh_folder,
    lockstep_settings,
    log,
    run_process,
    versions,
    where_and_when,
    write_lockstep_config,
)

CASES = ("full", "lora")
CHECKS = (  # (name, method, loss, tools): the first-step agreement runs
    ("dpo-full", "full", "dpo", TOOLS),
    ("dpo-lora", "lora", "dpo", TOOLS),
    ("simpo-full", "full", "simpo", ["lockstep", "llamafactory"]),
    ("orpo-full", "full", "orpo", ["lockstep", "llamafactory"]),
)
CHECK_STEPS = 2
TOLERANCE = 1e-4  # absolute, on the losses and on the summed log-probabilities alike
PEER_LOSS = {"dpo": "sigmoid", "simpo": "simpo", "orpo": "orpo"}
REFERENCE_PASS = re.compile(r"reference log-probabilities: computed in ([0-9.]+)s")


# ---------------------------------------------------------------- one run of one tool


def lockstep_config(args, name: str, method: str, loss: str, data: Path, model: Path) -> Path:
    steps = args.steps if name in CASES else CHECK_STEPS
    cfg = lockstep_settings(args, model, method, args.micro, args.accum, steps)
    cfg["finetune"]["stage"] = "preference"
    cfg["preference"] = {
        "loss": loss,
        "beta": args.beta,
        "gamma": args.gamma,
        **({"orpo_lambda": args.beta} if loss == "orpo" else {}),
    }
    cfg["data"] = {
        "train": [{"path": str(data), "format": "alpaca"}],
        "max_length": args.max_length,
    }
    return write_lockstep_config(f"dpo-{name}", f"bench/vs_peers/dpo.py, {name}", cfg)


def run_tool(args, tool: str, name: str, method: str, loss: str, data: Path, steps: int,
             rnd: int, pys: dict) -> dict:  # fmt: skip
    assets = WORK / "assets"
    out = fresh_folder(f"dpo-{tool}-{name}-{rnd}")
    if tool == "lockstep":
        cfg = lockstep_config(args, name, method, loss, data, assets / "model")
        cmd = [
            str(LOCKSTEP_PY), "-m", "lockstep", "train", str(cfg), f"output_dir={out / 'run'}",
            f"data.cache_dir={out / 'cache'}", *args.lockstep_set,
        ]  # fmt: skip
    else:
        spec = {
            "stage": "dpo", "loss": PEER_LOSS[loss], "beta": args.beta, "gamma": args.gamma,
            "model": str(assets / "model"), "data": str(data),
            "dataset": "bench_" + data.stem, "output_dir": str(out / "run"),
            "result": str(out / "result.json"), "steps": steps, "micro": args.micro,
            "accum": args.accum, "max_length": args.max_length, "lr": args.lr, "seed": args.seed,
            "method": method, "packing": False,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0},
        }  # fmt: skip
        (out / "spec.json").write_text(json.dumps(spec, indent=2))
        cmd = [str(pys[tool]), str(HERE / f"run_{tool}.py"), str(out / "spec.json")]
    row = {"tool": tool, "case": name, "round": rnd, **run_process(cmd, out)}
    if "error" in row:
        return row
    per_step = args.micro * args.accum
    row.update(lockstep_result(out, per_step) if tool == "lockstep" else peer_result(out))
    row["pairs_per_s"] = round(row["pairs"] / row["train_s"], 3)
    if row["steps"] != steps:
        log(f"warning: {tool} {name} ran {row['steps']} steps, not {steps}")
    for folder in ("run", "cache", "hf_cache", "hf_home"):
        shutil.rmtree(out / folder, ignore_errors=True)
    return row


def lockstep_result(out: Path, per_step: int) -> dict:
    """lockstep's step rows; each step trains one global batch of pairs (the data is a whole
    number of global batches, so no step holds an empty slot)."""
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    found = REFERENCE_PASS.search((out / "log.txt").read_text(errors="replace"))
    reference_s = float(found.group(1)) if found else 0.0
    return {
        "train_s": rows[-1]["elapsed_s"] + reference_s,
        "reference_pass_s": reference_s,
        "steps": rows[-1]["step"],
        "pairs": rows[-1]["step"] * per_step,
        "target_tokens": sum(r["target_tokens"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "losses": [r["loss"] for r in rows],
        "first": {k: rows[0].get(k) for k in ("loss", "logps/chosen", "logps/rejected")},
    }


def peer_result(out: Path) -> dict:
    m = json.loads((out / "result.json").read_text())
    first = m["logs"][0] if m["logs"] else {}
    return {
        "train_s": m["train_s"],
        "steps": m["steps"],
        "pairs": m["rows"] // 2,
        "target_tokens": m["target_tokens"],
        "tokens": m["tokens"],
        "losses": m["losses"],
        "first": {k: first.get(k) for k in ("loss", "logps/chosen", "logps/rejected")},
        "model": m.get("model"),
    }


# ---------------------------------------------------------------- the two parts


def agreement(args, pys: dict, tools: list[str]) -> list[dict]:
    """The first-step check: each (check, tool) run, compared with lockstep's."""
    data = WORK / "assets" / "data" / "check.jsonl"
    rows = []
    for name, method, loss, check_tools in CHECKS:
        runs = {}
        for tool in [t for t in check_tools if t in tools]:
            log(f"check {name}: {tool}")
            runs[tool] = run_tool(args, tool, name, method, loss, data, CHECK_STEPS, 0, pys)
        base = runs.get("lockstep")
        for tool, r in runs.items():
            if tool == "lockstep":
                continue
            failed = [t for t, x in (("lockstep", base), (tool, r)) if not x or "error" in x]
            if failed:  # a failed run is a failed check, never a skipped one
                rows.append({"check": name, "peer": tool, "values": {}, "agree": False,
                             "error": f"{', '.join(failed)} failed"})  # fmt: skip
                continue
            rows.append(compare(name, loss, tool, base, r))
    return rows


def compare(name: str, loss: str, tool: str, base: dict, other: dict) -> dict:
    """What can be compared between two runs of one check, and whether it agrees. LoRA's step 2
    is shown, not judged: each tool draws the adapters' A matrices from its own random stream,
    so one step of training moves the adapters differently (the step-1 values, where B = 0
    makes the adapters a no-op, are judged)."""
    row = {"check": name, "peer": tool, "values": {}, "agree": True}

    def put(key: str, ours: float, theirs: float, judged: bool = True) -> None:
        diff = abs(ours - theirs)
        limit = TOLERANCE
        row["values"][key] = {"lockstep": ours, tool: theirs, "diff": diff, "limit": limit,
                              "judged": judged}  # fmt: skip
        if judged:
            row["agree"] = row["agree"] and diff <= limit

    put("loss step 1", base["losses"][0], other["losses"][0])
    if loss == "dpo":  # the summed log-probabilities (SimPO/ORPO peers log per-token means)
        for key in ("logps/chosen", "logps/rejected"):
            put(f"{key} step 1", base["first"][key], other["first"][key])
        lora = name.endswith("lora")
        put("loss step 2", base["losses"][1], other["losses"][1], judged=not lora)
    return row


def speed(args, pys: dict, tools: list[str]) -> list[dict]:
    data = WORK / "assets" / "data" / "pairs.jsonl"
    runs = []
    total = args.repeats * len(args.cases) * len(tools)
    for rnd in range(args.repeats):
        for case in args.cases:
            shift = rnd % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                log(f"[{len(runs) + 1}/{total}] round {rnd + 1}: {tool} dpo {case}")
                row = run_tool(args, tool, case, case, "dpo", data, args.steps, rnd, pys)
                runs.append(row)
                if "error" not in row:
                    log(
                        f"  {row['pairs_per_s']:.2f} pairs/s ({row['pairs']} in "
                        f"{row['train_s']:.1f}s), wall {row['wall_s']:.1f}s, "
                        f"RSS {row['peak_rss_mib']:,.0f} MiB, last loss {row['losses'][-1]:.4f}"
                    )
    return runs


def summarise(runs: list[dict], tools: list[str], cases: list[str]) -> list[dict]:
    summary = []
    for case in cases:
        for tool in tools:
            ok = [r for r in runs if r["tool"] == tool and r["case"] == case and "error" not in r]
            row = {"tool": tool, "case": case, "runs": len(ok)}
            for key in ("pairs_per_s", "train_s", "wall_s", "peak_rss_mib", "tokens",
                        "reference_pass_s"):  # fmt: skip
                values = [r[key] for r in ok if key in r]
                if values:
                    row[key] = statistics.median(values)
            summary.append(row)
    return summary


def ratios(summary: list[dict], cases: list[str]) -> list[dict]:
    by = {(s["tool"], s["case"]): s for s in summary if s["runs"]}
    out = []
    for case in cases:
        ours = by.get(("lockstep", case))
        peers = [s for (t, c), s in by.items() if c == case and t != "lockstep"]
        if not ours or not peers:
            continue
        fastest = max(peers, key=lambda p: p["pairs_per_s"])
        leanest = min(peers, key=lambda p: p["peak_rss_mib"])
        out.append({
            "case": case,
            "pairs_per_s_vs_fastest": round(ours["pairs_per_s"] / fastest["pairs_per_s"], 3),
            "fastest_peer": fastest["tool"],
            "peak_rss_vs_leanest": round(ours["peak_rss_mib"] / leanest["peak_rss_mib"], 3),
            "leanest_peer": leanest["tool"],
        })  # fmt: skip
    return out


def print_report(checks: list[dict], summary: list[dict], ratio_rows: list[dict]) -> None:
    if checks:
        print("\nfirst steps on the same 16 pairs: lockstep, the peer, |difference| (limit)")
        for c in checks:
            verdict = c.get("error") or ("agree" if c["agree"] else "DIFFER")
            print(f"  {c['check']:<11} lockstep vs {c['peer']:<13} {verdict}")
            for key, v in c["values"].items():
                limit = f"({v['limit']:.1e})" if v["judged"] else "(not judged)"
                print(f"      {key:<22} {v['lockstep']:>14.6f} {v[c['peer']]:>14.6f} "
                      f"{v['diff']:.1e} {limit}")  # fmt: skip
    if summary:
        head = f"\n{'tool':<13} {'case':<6} {'pairs/s':>8} {'train s':>8} {'wall s':>8} {'peak RSS MiB':>13}"  # noqa: E501
        print(head)
        print("-" * len(head))
        for s in summary:
            if not s["runs"]:
                print(f"{s['tool']:<13} {s['case']:<6} {'failed':>8}")
                continue
            print(f"{s['tool']:<13} {s['case']:<6} {s['pairs_per_s']:>8.2f} {s['train_s']:>8.1f} "
                  f"{s['wall_s']:>8.1f} {s['peak_rss_mib']:>13,.0f}")  # fmt: skip
    for r in ratio_rows:
        print(f"  {r['case']}: pairs/s {r['pairs_per_s_vs_fastest']:.2f}x the fastest peer "
              f"({r['fastest_peer']}), peak RSS {r['peak_rss_vs_leanest']:.2f}x the leanest "
              f"({r['leanest_peer']})")  # fmt: skip
    print()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of a speed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--micro", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.5, help="SimPO's target margin")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-check", action="store_true", help="no first-step agreement runs")
    p.add_argument("--skip-speed", action="store_true", help="the agreement runs only")
    p.add_argument("--lockstep-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=HERE / "results-dpo.json")
    args = p.parse_args()
    if args.micro * args.accum != 16:
        sys.exit("dpo.py: --micro x --accum must be 16, the pairs of data/check.jsonl")

    t_start = time.perf_counter()
    ensure_lockstep()
    pys = {t: ensure_peer(t) for t in args.tools if t != "lockstep"}
    pairs = args.steps * args.micro * args.accum
    subprocess.run(
        [str(LOCKSTEP_PY), str(HERE / "make_assets.py"), "--out", str(WORK / "assets"),
         "--seed", str(args.seed), "--pairs", str(pairs), "--check-pairs", "16"],
        check=True, env={**os.environ, **ENV},
    )  # fmt: skip
    vers = {
        "lockstep": versions(LOCKSTEP_PY, ["lockstep-finetune", "torch", "transformers", "peft"])
    }
    for tool, py in pys.items():
        vers[tool] = versions(py, [tool, "torch", "transformers", "peft", "accelerate"])
    load = os.getloadavg()[0]
    if load > 0.25 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.1f} before the runs; timings will swing")

    checks = [] if args.skip_check else agreement(args, pys, args.tools)
    runs = [] if args.skip_speed else speed(args, pys, args.tools)
    summary = summarise(runs, args.tools, args.cases)
    ratio_rows = ratios(summary, args.cases)
    print_report(checks, summary, ratio_rows)
    assets = json.loads((WORK / "assets" / "assets.json").read_text())["summary"]
    result = {
        **where_and_when(load),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "assets": {"model_parameters": assets["parameters"], "pairs": assets["pairs"]},
        "versions": vers,
        "checks": checks,
        "summary": summary,
        "ratios": ratio_rows,
        "runs": runs,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out} ({result['total_s'] / 60:.1f} min in all)")
    failed = any("error" in r for r in runs) or not all(c["agree"] for c in checks)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
