"""lockstep vs TRL (SFTTrainer) vs LLaMA-Factory: the same fine-tuning on the CPU, side by side.

    python3 bench/vs_peers/run.py [--steps 20] [--repeats 3] [--cases full lora ...]
                                  [--tools lockstep trl llamafactory] [--lockstep-set KEY=VALUE ...]

One command on a fresh machine (Python >= 3.10 and pip; this file needs the standard library
only). It:

1. creates lockstep's venv with scripts/setup.sh if there is none (.venv);
2. creates a venv per peer, bench/.venvs/trl and bench/.venvs/llamafactory (``python -m venv``):
   ``torch==2.13.0`` first, then the tool with a constraint file pinning that torch, so nothing
   pulls another build. torchvision and torchaudio are never installed (LLaMA-Factory 0.9.5
   requires both: it is installed with ``--no-deps``, then its requirements less those two; see
   run_llamafactory.py). A venv whose install completed carries a marker file and is reused;
3. builds the shared model and data under bench/vs_peers/work/assets (make_assets.py);
4. trains every case with every tool, ``--repeats`` times, alternating the tools (the order
   rotates each round, so a slow phase of the machine does not land on one tool); each run is a
   fresh process with a fresh output folder and a cold data cache (each tool tokenises);
5. prints a table of medians and the lockstep/peer ratios, and writes --out (JSON, every run).

The cases (--cases): ``full``, ``lora``, ``full+packing``, ``lora+packing``. Every tool gets the
same model folder, data file, micro-batch (--micro), gradient accumulation (--accum), max length
(--max-length), learning rate (--lr, cosine, no warmup, no weight decay, gradient clipping 1.0),
optimizer steps (--steps), seed, float32, sdpa attention, no gradient checkpointing, 0 dataloader
workers, LoRA r/alpha/dropout on every linear layer of the blocks (q k v o gate up down), and
the same tokens to train on: ChatML, no system prompt, loss on ``{output}<|im_end|>\\n`` (see
make_assets.py). A step is --micro x --accum samples, or packed sequences of --max-length when
packing. Every process runs with the hub offline and without a visible GPU.

What is measured, per run:

* tokens/s: target tokens / training-loop seconds. Target tokens are the positions that carry
  loss (labels != -100 after the one-token shift), counted on every micro-batch the tool really
  trained on: lockstep's metrics.jsonl ``target_tokens``; for TRL and LLaMA-Factory, counted in
  ``Trainer.training_step`` (hf_probe.py). The loop time is lockstep's ``elapsed_s`` at the last
  step (its clock starts once model and data are built), and for the peers the time from the
  Trainer's on_train_begin to the end of the last optimizer step (``train_runtime`` is kept in the
  JSON too). The three tools shuffle differently, so their steps cover different samples; the
  numerator is each tool's own count, never an estimate.
* wall s: the whole process, start to exit (imports, tokenising, model loading, training,
  saving the final model; lockstep also writes its end-of-run checkpoint and loss plot).
* peak RSS: the largest resident set of the process (and any children), from ``os.wait4``.
* final loss: the mean of the last 5 optimizer steps' losses (token-normalised over each step
  in all three tools). The tools see the samples in different orders, so this is a check that
  all of them train, not a ranking.

The median over the repeats is reported. ``--lockstep-set KEY=VALUE`` (repeatable) passes extra
overrides to every lockstep run, e.g. ``--lockstep-set data.num_proc=2``; lockstep's configs are
written to work/configs/ (``log.every_steps`` must stay 1: tokens are summed over the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = HERE / "work"
VENVS = ROOT / "bench" / ".venvs"
LOCKSTEP_PY = ROOT / ".venv" / "bin" / "python"

TORCH = "torch==2.13.0"
PEERS = {  # what goes into each peer's venv after torch
    "trl": {"install": ["trl[peft]==1.16.0"], "no_deps": False},
    "llamafactory": {"install": ["llamafactory==0.9.5"], "no_deps": True},
}
NEVER = {"torch", "torchvision", "torchaudio"}  # torch comes first, pinned; the others never
TOOLS = ["lockstep", "trl", "llamafactory"]
CASES = {  # name: (method, packing)
    "full": ("full", False),
    "lora": ("lora", False),
    "full+packing": ("full", True),
    "lora+packing": ("lora", True),
}
LAST_LOSSES = 5
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


def log(msg: str) -> None:
    print(f"[vs_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list, logfile: Path, **kw) -> None:
    """Run a setup command, its output appended to logfile; on failure show the end of it."""
    with logfile.open("a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        sys.exit(
            f"vs_peers: failed ({rc}): {' '.join(map(str, cmd))}\n"
            + "\n".join(tail)
            + f"\n(full log: {logfile})"
        )


# ---------------------------------------------------------------- environments


def ensure_lockstep() -> None:
    if not LOCKSTEP_PY.exists():
        log("no .venv: running scripts/setup.sh")
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], check=True, cwd=ROOT)


def ensure_peer(tool: str) -> Path:
    """bench/.venvs/<tool>: torch first (pinned), then the tool under a torch constraint."""
    venv = VENVS / tool
    py, marker = venv / "bin" / "python", venv / ".bench-complete"
    want = json.dumps({"torch": TORCH, **PEERS[tool]}, sort_keys=True)
    if marker.is_file() and marker.read_text() == want and py.exists():
        return py
    log(f"setting up {venv} (a few minutes; log: {venv}.log)")
    VENVS.mkdir(parents=True, exist_ok=True)
    logfile = Path(f"{venv}.log")
    logfile.write_text("")
    constraints = VENVS / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(venv)], logfile)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    sh([*pip, TORCH], logfile)
    spec = PEERS[tool]
    if spec["no_deps"]:  # install the tool alone, then its requirements less torchvision/audio
        sh([*pip, "--no-deps", *spec["install"]], logfile)
        name = spec["install"][0].split("=")[0]
        code = (
            f"import importlib.metadata as m; print('\\n'.join(r for r in m.requires({name!r}) "
            "or [] if 'extra ==' not in r))"
        )
        reqs = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
        keep = [r for r in reqs.stdout.splitlines() if _req_name(r) not in NEVER]
        req_file = VENVS / f"{tool}-requirements.txt"
        req_file.write_text("\n".join(keep) + "\n")
        sh([*pip, "-c", str(constraints), "-r", str(req_file)], logfile)
    else:
        sh([*pip, "-c", str(constraints), *spec["install"]], logfile)
    present = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(present.stdout)}
    if names & {"torchvision", "torchaudio"}:
        sys.exit(f"vs_peers: {venv} has {names & {'torchvision', 'torchaudio'}}; remove the venv")
    marker.write_text(want)
    return py


def _req_name(req: str) -> str:
    for sep in "<>=!~[;( ":
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-")


def versions(py: Path, modules: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(py), "-c", code, *modules], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# ---------------------------------------------------------------- configs


def to_yaml(value, indent: int = 0) -> str:
    """A small YAML writer for nested dicts and lists of plain values (keeps this file stdlib)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n{to_yaml(v, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
        return "\n".join(lines)
    return "\n".join(
        f"{pad}- " + to_yaml(item, indent + 1).lstrip()
        if isinstance(item, dict)
        else f"{pad}- {_scalar(item)}"
        for item in value
    )


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return json.dumps(str(v))


def lockstep_config(args, case: str, assets: Path) -> Path:
    method, packing = CASES[case]
    cfg = {
        "output_dir": "(set per run)",
        "seed": args.seed,
        "model": {"path": str(assets / "model"), "dtype": "float32"},
        "finetune": {
            "method": method,
            "lora": {
                "r": args.lora_r,
                "alpha": float(args.lora_alpha),
                "dropout": 0.0,
                "target_modules": "all-linear",
            },
        },
        "data": {
            "train": [{"path": str(assets / "data" / "train.jsonl"), "format": "alpaca"}],
            "max_length": args.max_length,
            "packing": packing,
        },
        "batch": {"global_size": args.micro * args.accum, "micro_size": args.micro},
        "train": {"max_steps": args.steps},
        "optim": {
            "lr": args.lr,
            "scheduler": "cosine",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
        },
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1},
    }
    path = WORK / "configs" / f"lockstep-{case.replace('+', '-')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# lockstep side of bench/vs_peers, case {case}\n{to_yaml(cfg)}\n")
    return path


def peer_spec(args, case: str, assets: Path, out: Path) -> Path:
    method, packing = CASES[case]
    spec = {
        "model": str(assets / "model"),
        "data": str(assets / "data" / "train.jsonl"),
        "output_dir": str(out / "run"),
        "result": str(out / "result.json"),
        "steps": args.steps,
        "micro": args.micro,
        "accum": args.accum,
        "max_length": args.max_length,
        "lr": args.lr,
        "seed": args.seed,
        "method": method,
        "packing": packing,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0},
    }
    path = out / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


# ---------------------------------------------------------------- runs


def fresh_folder(name: str) -> Path:
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def run_process(cmd: list[str], out: Path) -> dict:
    """Run one tool's training process (hub offline, no GPU, fresh caches under `out`), its
    output in out/log.txt: wall s, peak RSS (the process and its children) and the log; with
    "error" when it failed (the end of the log shown)."""
    env = {
        **os.environ,
        **ENV,
        "HF_DATASETS_CACHE": str(out / "hf_cache"),
        "HF_HOME": str(out / "hf_home"),
    }
    logfile = out / "log.txt"
    with logfile.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    row = {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "log": str(logfile),
    }
    if code:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        log(f"FAILED (exit {code}); last lines of {logfile}:\n  " + "\n  ".join(tail))
        row["error"] = f"exit {code}"
    return row


def run_one(args, tool: str, case: str, rnd: int, assets: Path, pys: dict) -> dict:
    out = fresh_folder(f"{tool}-{case.replace('+', '-')}-{rnd}")
    if tool == "lockstep":
        cfg = lockstep_config(args, case, assets)
        cmd = [
            str(LOCKSTEP_PY),
            "-m",
            "lockstep",
            "train",
            str(cfg),
            f"output_dir={out / 'run'}",
            f"data.cache_dir={out / 'cache'}",
            *args.lockstep_set,
        ]
    else:
        cmd = [
            str(pys[tool]),
            str(HERE / f"run_{tool}.py"),
            str(peer_spec(args, case, assets, out)),
        ]
    row = {"tool": tool, "case": case, "round": rnd, **run_process(cmd, out)}
    if "error" in row:
        return row
    m = (
        lockstep_metrics(out / "run")
        if tool == "lockstep"
        else json.loads((out / "result.json").read_text())
    )
    losses = m["losses"]
    row.update(
        {
            "train_s": round(m["train_s"], 3),
            "steps": m["steps"],
            "target_tokens": m["target_tokens"],
            "tokens": m["tokens"],
            "tokens_per_s": round(m["target_tokens"] / m["train_s"], 1),
            "final_loss": round(statistics.fmean(losses[-LAST_LOSSES:]), 4),
            "losses": [round(x, 4) for x in losses],
            **{k: m[k] for k in ("train_runtime", "model", "padding_free") if k in m},
        }
    )
    if row["steps"] != args.steps:
        log(f"warning: {tool} {case} ran {row['steps']} steps, not {args.steps}")
    shutil.rmtree(out / "run", ignore_errors=True)  # model files: not needed, and large
    for cache in ("cache", "hf_cache", "hf_home"):
        shutil.rmtree(out / cache, ignore_errors=True)
    return row


def lockstep_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {
        "train_s": rows[-1]["elapsed_s"],
        "steps": rows[-1]["step"],
        "target_tokens": sum(r["target_tokens"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "losses": [r["loss"] for r in rows],
    }


# ---------------------------------------------------------------- report


def summarise(runs: list[dict], tools: list[str], cases: list[str]) -> list[dict]:
    summary = []
    for case in cases:
        for tool in tools:
            ok = [r for r in runs if r["tool"] == tool and r["case"] == case and "error" not in r]
            failed = sum(
                1 for r in runs if r["tool"] == tool and r["case"] == case and "error" in r
            )
            row = {"tool": tool, "case": case, "runs": len(ok), "failed": failed}
            if ok:
                for key in (
                    "tokens_per_s",
                    "wall_s",
                    "peak_rss_mib",
                    "final_loss",
                    "train_s",
                    "target_tokens",
                ):
                    row[key] = statistics.median(r[key] for r in ok)
            summary.append(row)
    return summary


def ratios(summary: list[dict], cases: list[str]) -> list[dict]:
    """lockstep / peer for each metric, and against the best peer (faster, shorter, leaner)."""
    out = []
    by = {(s["tool"], s["case"]): s for s in summary if s["runs"]}
    for case in cases:
        ls = by.get(("lockstep", case))
        peers = [s for (t, c), s in by.items() if c == case and t != "lockstep"]
        if not ls or not peers:
            continue
        for key, best in (("tokens_per_s", max), ("wall_s", min), ("peak_rss_mib", min)):
            row = {"case": case, "metric": key}
            for p in peers:
                row[p["tool"]] = round(ls[key] / p[key], 3)
            top = best(peers, key=lambda p: p[key])
            row["best_peer"] = top["tool"]
            row["vs_best_peer"] = round(ls[key] / top[key], 3)
            out.append(row)
    return out


def print_tables(summary: list[dict], ratio_rows: list[dict], peers: list[str]) -> None:
    print()
    head = f"{'tool':<13} {'case':<13} {'tokens/s':>9} {'wall s':>8} {'peak RSS MiB':>13} {'final loss':>11} {'runs':>5}"  # noqa: E501
    print(head)
    print("-" * len(head))
    for s in summary:
        if not s["runs"]:
            print(f"{s['tool']:<13} {s['case']:<13} {'failed':>9}")
            continue
        print(
            f"{s['tool']:<13} {s['case']:<13} {s['tokens_per_s']:>9,.0f} {s['wall_s']:>8.1f} "
            f"{s['peak_rss_mib']:>13,.0f} {s['final_loss']:>11.4f} {s['runs']:>5}"
        )
    if not ratio_rows:
        return
    print("\nlockstep / peer (tokens/s: higher is better for lockstep; wall s and RSS: lower)")
    head = f"{'case':<13} {'metric':<13}" + "".join(f" {p:>13}" for p in peers) + "   vs best peer"
    print(head)
    print("-" * len(head))
    for r in ratio_rows:
        cells = "".join(f" {r[p]:>12.2f}x" if p in r else f" {'-':>13}" for p in peers)
        print(
            f"{r['case']:<13} {r['metric']:<13}{cells}   {r['vs_best_peer']:.2f}x "
            f"({r['best_peer']})"
        )
    print()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--micro", type=int, default=4, help="micro-batch (samples per forward pass)")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=int, default=4000, help="alpaca records to generate")
    p.add_argument(
        "--lockstep-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra lockstep override for every lockstep run (repeatable)",
    )
    p.add_argument("--setup-only", action="store_true", help="create venvs and assets, then stop")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    if args.max_length < 500:
        sys.exit("vs_peers: --max-length must be >= 500 (the longest generated record)")

    t_start = time.perf_counter()
    ensure_lockstep()
    pys = {t: ensure_peer(t) for t in args.tools if t != "lockstep"}
    assets = WORK / "assets"
    subprocess.run(
        [
            str(LOCKSTEP_PY),
            str(HERE / "make_assets.py"),
            "--out",
            str(assets),
            "--seed",
            str(args.seed),
            "--records",
            str(args.records),
        ],
        check=True,
        env={**os.environ, **ENV},
    )
    vers = {"lockstep": versions(LOCKSTEP_PY, ["lockstep", "torch", "transformers", "peft"])}
    for tool, py in pys.items():
        name = "llamafactory" if tool == "llamafactory" else "trl"
        vers[tool] = versions(py, [name, "torch", "transformers", "peft", "accelerate", "datasets"])
    for tool, v in vers.items():
        log(f"{tool}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if args.setup_only:
        return

    load = os.getloadavg()[0]
    if load > 0.25 * (os.cpu_count() or 1):
        log(
            f"warning: load average {load:.1f} before the runs; timings on a busy machine swing "
            "by several times (its threads and the benchmark's compete for the same cores)"
        )
    runs = []
    total = args.repeats * len(args.cases) * len(args.tools)
    for rnd in range(args.repeats):
        for case in args.cases:
            shift = rnd % len(args.tools)
            for tool in args.tools[shift:] + args.tools[:shift]:
                log(f"[{len(runs) + 1}/{total}] round {rnd + 1}: {tool} {case}")
                row = run_one(args, tool, case, rnd, assets, pys)
                runs.append(row)
                if "error" not in row:
                    log(
                        f"  {row['tokens_per_s']:,.0f} target tok/s ({row['target_tokens']} in "
                        f"{row['train_s']:.1f}s), wall {row['wall_s']:.1f}s, "
                        f"RSS {row['peak_rss_mib']:,.0f} MiB, loss {row['final_loss']:.4f}"
                    )

    summary = summarise(runs, args.tools, args.cases)
    ratio_rows = ratios(summary, args.cases)
    peers = [t for t in args.tools if t != "lockstep"]
    print_tables(summary, ratio_rows, peers)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    assets_info = json.loads((assets / "assets.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": round(load, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "settings": settings,
        "assets": assets_info["summary"],
        "versions": vers,
        "summary": summary,
        "ratios": ratio_rows,
        "runs": runs,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out} ({result['total_s'] / 60:.1f} min in all)")
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
