"""lockstep vs TRL (SFTTrainer) vs LLaMA-Factory: the same fine-tuning on the CPU, side by side.

    python3 bench/vs_peers/run.py [--fixture small|realistic] [--steps 20] [--repeats 3]
                                  [--cases full lora ...] [--tools lockstep trl llamafactory]
                                  [--lockstep-set KEY=VALUE ...]

One command on a fresh machine (Python >= 3.10 and pip; this file needs the standard library
only). It:

1. creates lockstep's venv with scripts/setup.sh if there is none (.venv);
2. creates a venv per peer, bench/.venvs/trl and bench/.venvs/llamafactory (``python -m venv``):
   ``torch==2.13.0`` first, then the tool with a constraint file pinning that torch, so nothing
   pulls another build. torchvision and torchaudio are never installed (LLaMA-Factory 0.9.5
   requires both: it is installed with ``--no-deps``, then its requirements less those two; see
   run_llamafactory.py). A venv whose install completed carries a marker file and is reused;
3. builds the shared model and data of --fixture under bench/vs_peers/work/assets (small) or
   work/assets-realistic (make_assets.py, which describes both);
4. trains every case with every tool, ``--repeats`` times, alternating the tools (the order
   rotates each round, so a slow phase of the machine does not land on one tool); each run is a
   fresh process with a fresh output folder and a cold data cache (each tool tokenises);
5. prints a table of medians and the lockstep/peer ratios (each metric against every peer and
   against the best one: for tokens/s, lockstep / the fastest peer), and writes --out (JSON,
   every run; results.json for the small fixture, results-realistic.json for the other).

The fixtures (--fixture) and the settings each one defaults to (all overridable):

* ``small`` (the default, comparable with earlier results): ~10M parameters, vocabulary 2,048,
  records of 20-500 tokens (median 46); micro-batch 4, accumulation 4, max length 512, and the
  same 4 x 4 packed rows per step when packing.
* ``realistic``: ~58M parameters shaped like a scaled-down Llama-3 (vocabulary 32,768, untied),
  records with chat data's lengths (median ~130 tokens, tail to ~2,000); max length 2048 (no
  record is cut), micro-batch 2, accumulation 2 (4 records per step), and with packing 1 x 1
  packed row of 2,048 tokens per step (--pack-micro, --pack-accum): about 12 records, so a
  packed step costs ~3x an unpacked one instead of ~10x and a run stays a few minutes on 2 cores.

The cases (--cases): ``full``, ``lora``, ``full+packing``, ``lora+packing``. Every tool gets the
same model folder, data file, micro-batch (--micro), gradient accumulation (--accum), max length
(--max-length), learning rate (--lr, cosine, no warmup, no weight decay, gradient clipping 1.0),
optimizer steps (--steps), seed, float32, sdpa attention, no gradient checkpointing, 0 dataloader
workers, LoRA r/alpha/dropout on every linear layer of the blocks (q k v o gate up down), and
the same tokens to train on: ChatML, no system prompt, loss on ``{output}<|im_end|>\\n`` (see
make_assets.py). A step is --micro x --accum samples, or packed sequences of --max-length when
packing. Every process runs with the hub offline and without a visible GPU.

The same records at every step (the cases without packing): the peers read
data/train-ordered.jsonl, the records in the order lockstep trains on them with --seed
(make_assets.py), sequentially (TRL ``train_sampling_strategy="sequential"``, LLaMA-Factory
``disable_shuffling``), so step k of every tool trains lockstep's global batch k; inside a step,
lockstep groups the records into micro-batches by length, the peers take them as they come.
The summary checks it: the target tokens of every tool must be equal (``same_records``). With
packing, each tool packs the shuffled records its own way: the rows are full either way (~the
same tokens per step), but hold different records.

What is measured, per run:

* tokens/s: non-padding tokens / training-loop seconds (``all_tokens_per_s``; the whole
  records, prompt and answer, each tool's own count) and target tokens / training-loop seconds
  (``tokens_per_s``; with the same records both give the same ratios). Target tokens are the
  positions that carry loss (labels != -100 after the one-token shift), counted on every
  micro-batch the tool really trained on: lockstep's metrics.jsonl ``target_tokens``; for TRL and LLaMA-Factory, counted in
  ``Trainer.training_step`` (hf_probe.py). The loop time is lockstep's ``elapsed_s`` at the last
  step (its clock starts once model and data are built), and for the peers the time from the
  Trainer's on_train_begin to the end of the last optimizer step (``train_runtime`` is kept in the
  JSON too). The numerators are each tool's own counts, never an estimate.
* wall s: the whole process, start to exit (imports, tokenising, model loading, training,
  saving the final model; lockstep also writes its end-of-run checkpoint and loss plot).
* peak RSS: the largest resident set of the process (and any children), from ``os.wait4``.
* final loss: the mean of the last 5 optimizer steps' losses (token-normalised over each step
  in all three tools). Without packing the tools train the same records, so the losses should
  be close (micro-batch grouping and kernels reorder float sums); with packing they differ by
  the records each row holds: a check that all of them train, not a ranking.
* matmul peak: right before each run, matmul_peak.py (in lockstep's venv, torch's default
  threads, as the peers use) times square float32 matmuls of 512, 1024 and 2048 and reports
  the best GFLOP/s: what a dense GEMM reaches on this machine at that moment. Each run's own
  intra-op thread count is stored as ``threads``: the peers use torch's default (one per core);
  lockstep leaves out the cores other work is using (lockstep/threads.py, its log's first line),
  so on a busy machine it may run on fewer threads than the peak was measured with.
* achieved GFLOP/s and its share of that peak: model FLOPs of the run / its training-loop
  seconds, and that / the peak. Model FLOPs are counted from the model's shape (config.json)
  and the run's own token counts, the usual way (matmuls only, 2 FLOPs per multiply-add,
  backward = 2x forward):

  - the blocks (N = the weights of q, k, v, o, gate, up, down in all layers): full fine-tuning
    6 N per token (forward 2 N, input gradient 2 N, weight gradient 2 N); LoRA 4 N per token
    (the frozen weights' forward and input gradient) plus 6 x the adapters' own weights
    (r x (in + out) per projection). Layer 0's q, k and v need no input gradient (they read the
    frozen embedding's output), so this overcounts LoRA slightly: 2 x their weights and
    adapters' A per token (0.7% of the realistic model's LoRA FLOPs).
  - attention: 12 x layers x heads x head_dim x S per token, S the mean over tokens of the
    length of the sample a token is in (sum n^2 / sum n over the data set, assets.json's
    ``attention_span``): each sample attending over itself alone, with no causal halving (the
    usual convention). Work across samples in a masked packed row, or on padding, is not
    counted.
  - the LM head (vocabulary x hidden): 6 per weight and position for full fine-tuning (it
    trains), 4 for LoRA (frozen: forward and input gradient), on the positions each tool
    really runs it on: lockstep only on target tokens (its chunked loss gathers them before
    the head), TRL and LLaMA-Factory on every position (the model's full logits); padding
    positions are not counted for any tool.
  - tokens are each tool's own non-padding count (lockstep's ``tokens``; the peers' count in
    hf_probe.py). Not counted: the embedding lookup, norms, activations, softmax and cross
    entropy, RoPE, the optimizer, the peers' padded positions (stored as ``positions`` and
    ``padded_share``), and the masked cross-sample work of a packed row.

  So the achieved FLOP/s is how fast a tool does the model work it chose to do on real tokens;
  a tool that skips work (lockstep's head on targets only) does fewer FLOPs for the same
  tokens, which shows in tokens/s, not here.

The median over the repeats is reported. ``--lockstep-set KEY=VALUE`` (repeatable) passes extra
overrides to every lockstep run, e.g. ``--lockstep-set data.num_proc=2``; lockstep's configs are
written to work/configs/ (``log.every_steps`` must stay 1: tokens are summed over the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
FIXTURES = {  # name: assets folder, results file, and the settings that fit it (overridable)
    "small": {"assets": "assets", "out": "results.json", "micro": 4, "accum": 4,
              "pack_micro": 4, "pack_accum": 4, "max_length": 512},
    "realistic": {"assets": "assets-realistic", "out": "results-realistic.json", "micro": 2,
                  "accum": 2, "pack_micro": 1, "pack_accum": 1, "max_length": 2048},
}  # fmt: skip
HEAD_ON = {  # the token count each tool runs the LM head on (see the docstring)
    "lockstep": "target_tokens",
    "trl": "tokens",
    "llamafactory": "tokens",
}
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


def batch_shape(args, case: str) -> tuple[int, int]:
    """(micro-batch, accumulation) of a case: --pack-micro/--pack-accum when it packs."""
    return (args.pack_micro, args.pack_accum) if CASES[case][1] else (args.micro, args.accum)


def run_name(args, case: str) -> str:
    """The case's name in file names, prefixed with the fixture unless it is the small one."""
    name = case.replace("+", "-")
    return name if args.fixture == "small" else f"{args.fixture}-{name}"


def lockstep_settings(args, model: Path, method: str, micro: int, accum: int, steps: int) -> dict:
    """The lockstep config every benchmark run shares (run.py and dpo.py add their data): the
    seed, the model in float32, the method with LoRA on every linear layer, the batch, the steps,
    the optimizer (cosine, no warmup, no weight decay, clipping 1.0), no mid-run checkpoints and
    a metrics row every step (the orchestrators sum its tokens)."""
    return {
        "output_dir": "(set per run)",
        "seed": args.seed,
        "model": {"path": str(model), "dtype": "float32"},
        "finetune": {
            "method": method,
            "lora": {
                "r": args.lora_r,
                "alpha": float(args.lora_alpha),
                "dropout": 0.0,
                "target_modules": "all-linear",
            },
        },
        "batch": {"global_size": micro * accum, "micro_size": micro},
        "train": {"max_steps": steps},
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


def write_lockstep_config(name: str, what: str, cfg: dict) -> Path:
    """work/configs/lockstep-NAME.yaml holding `cfg`, headed by `what` it is for."""
    path = WORK / "configs" / f"lockstep-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# lockstep side of {what}\n{to_yaml(cfg)}\n")
    return path


def lockstep_config(args, case: str, assets: Path) -> Path:
    method, packing = CASES[case]
    micro, accum = batch_shape(args, case)
    cfg = lockstep_settings(args, assets / "model", method, micro, accum, args.steps)
    cfg["data"] = {
        "train": [{"path": str(assets / "data" / "train.jsonl"), "format": "alpaca"}],
        "max_length": args.max_length,
        "packing": packing,
    }
    return write_lockstep_config(run_name(args, case), f"bench/vs_peers, case {case}", cfg)


def peer_spec(args, case: str, assets: Path, out: Path) -> Path:
    method, packing = CASES[case]
    micro, accum = batch_shape(args, case)
    # without packing, the peers read lockstep's order sequentially: the same records per step
    spec = {
        "model": str(assets / "model"),
        "data": str(assets / "data" / ("train.jsonl" if packing else "train-ordered.jsonl")),
        "dataset": "bench" if packing else "bench_ordered",
        "sequential": not packing,
        "output_dir": str(out / "run"),
        "result": str(out / "result.json"),
        "steps": args.steps,
        "micro": micro,
        "accum": accum,
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


def matmul_peak() -> dict:
    """This machine's float32 matmul peak now (matmul_peak.py in lockstep's venv)."""
    out = subprocess.run(
        [str(LOCKSTEP_PY), str(HERE / "matmul_peak.py")],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    )
    if out.returncode:
        sys.exit(f"vs_peers: matmul_peak.py failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def model_flops(shape: dict, span: float, method: str, lora_r: int, tokens: int,
                head_positions: int) -> float:  # fmt: skip
    """Model FLOPs of a training run: `tokens` non-padding tokens through the blocks and
    attention (each token attending over a sample of `span` tokens), the LM head on
    `head_positions` of them; full fine-tuning or LoRA of rank lora_r on every projection of the
    blocks. Counted as the run.py docstring says (matmuls only, backward = 2x forward)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape.get("num_key_value_heads", shape["num_attention_heads"]) * head_dim
    projections = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    blocks = layers * sum(i * o for i, o in projections)
    head = shape["vocab_size"] * h
    attention = 12 * layers * q * span * tokens
    if method == "full":
        return 6 * blocks * tokens + attention + 6 * head * head_positions
    adapters = layers * sum(lora_r * (i + o) for i, o in projections)
    return (4 * blocks + 6 * adapters) * tokens + attention + 4 * head * head_positions


def run_one(args, tool: str, case: str, rnd: int, assets: Path, pys: dict) -> dict:
    out = fresh_folder(f"{tool}-{run_name(args, case)}-{rnd}")
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
    peak = matmul_peak()
    row = {"tool": tool, "case": case, "round": rnd, **run_process(cmd, out)}
    row["matmul_peak_gflops"] = peak["gflops"]
    row["matmul_peak"] = peak
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
            "all_tokens_per_s": round(m["tokens"] / m["train_s"], 1),
            "final_loss": round(statistics.fmean(losses[-LAST_LOSSES:]), 4),
            "losses": [round(x, 4) for x in losses],
            **{k: m[k] for k in ("train_runtime", "model", "padding_free", "threads") if k in m},
        }
    )
    if m.get("positions"):
        row["positions"] = m["positions"]
        row["padded_share"] = round(1 - m["tokens"] / m["positions"], 4)
    info = json.loads((assets / "assets.json").read_text())["summary"]
    flops = model_flops(
        json.loads((assets / "model" / "config.json").read_text()),
        info["attention_span"],
        CASES[case][0],
        args.lora_r,
        m["tokens"],
        m[HEAD_ON[tool]],
    )
    row["model_gflop"] = round(flops / 1e9, 1)
    row["achieved_gflops"] = round(flops / 1e9 / m["train_s"], 2)
    row["peak_share"] = round(row["achieved_gflops"] / peak["gflops"], 4)
    if row["steps"] != args.steps:
        log(f"warning: {tool} {case} ran {row['steps']} steps, not {args.steps}")
    shutil.rmtree(out / "run", ignore_errors=True)  # model files: not needed, and large
    for cache in ("cache", "hf_cache", "hf_home"):
        shutil.rmtree(out / cache, ignore_errors=True)
    return row


def lockstep_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    threads = re.search(r"(\d+) intra-op thread", (run_dir.parent / "log.txt").read_text())
    return {
        "threads": int(threads.group(1)) if threads else None,
        "train_s": rows[-1]["elapsed_s"],
        "steps": rows[-1]["step"],
        "target_tokens": sum(r["target_tokens"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "losses": [r["loss"] for r in rows],
    }


# ---------------------------------------------------------------- report


def where_and_when(load_before: float) -> dict:
    """What a results file says of its run: date, machine, CPUs, the load average before (as
    measured before the runs) and now, and the commit."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }


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
                    "all_tokens_per_s",
                    "tokens",
                    "wall_s",
                    "peak_rss_mib",
                    "final_loss",
                    "train_s",
                    "target_tokens",
                    "achieved_gflops",
                    "matmul_peak_gflops",
                    "peak_share",
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
        metrics = (("tokens_per_s", max), ("all_tokens_per_s", max), ("wall_s", min),
                   ("peak_rss_mib", min))  # fmt: skip
        for key, best in metrics:
            row = {"case": case, "metric": key}
            if key == "tokens_per_s" and not CASES[case][1]:  # unpacked: the same records
                row["same_records"] = all(p["target_tokens"] == ls["target_tokens"] for p in peers)
            for p in peers:
                row[p["tool"]] = round(ls[key] / p[key], 3)
            top = best(peers, key=lambda p: p[key])
            row["best_peer"] = top["tool"]
            row["vs_best_peer"] = round(ls[key] / top[key], 3)
            out.append(row)
    return out


def print_tables(summary: list[dict], ratio_rows: list[dict], peers: list[str]) -> None:
    print()
    head = f"{'tool':<13} {'case':<13} {'target/s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8} {'wall s':>8} {'peak RSS MiB':>13} {'final loss':>11} {'runs':>5}"  # noqa: E501
    print(head)
    print("-" * len(head))
    for s in summary:
        if not s["runs"]:
            print(f"{s['tool']:<13} {s['case']:<13} {'failed':>9}")
            continue
        print(
            f"{s['tool']:<13} {s['case']:<13} {s['tokens_per_s']:>9,.0f} "
            f"{s['all_tokens_per_s']:>9,.0f} "
            f"{s['achieved_gflops']:>8.1f} {s['peak_share']:>8.1%} {s['wall_s']:>8.1f} "
            f"{s['peak_rss_mib']:>13,.0f} {s['final_loss']:>11.4f} {s['runs']:>5}"
        )
    peaks = [s["matmul_peak_gflops"] for s in summary if s["runs"]]
    if peaks:
        print(
            f"matmul peak (float32, measured before each run): median {statistics.median(peaks):.1f}"
            f" GFLOP/s (range {min(peaks):.1f}-{max(peaks):.1f}); GFLOP/s: model FLOPs / loop s"
        )
    if not ratio_rows:
        return
    print("\nlockstep / peer (tokens/s: higher is better for lockstep; wall s and RSS: lower)")
    head = f"{'case':<13} {'metric':<17}" + "".join(f" {p:>13}" for p in peers) + "   vs best peer"
    print(head)
    print("-" * len(head))
    for r in ratio_rows:
        cells = "".join(f" {r[p]:>12.2f}x" if p in r else f" {'-':>13}" for p in peers)
        same = {True: "; the same records", False: "; DIFFERENT records"}.get(r.get("same_records"))
        print(
            f"{r['case']:<13} {r['metric']:<17}{cells}   {r['vs_best_peer']:.2f}x "
            f"({r['best_peer']}{same or ''})"
        )
    print()


def report(path: Path) -> None:
    """The tables of a results file, summarised again from its runs (a file written before
    a metric existed gets it from the runs' own numbers)."""
    result = json.loads(path.read_text())
    runs = result["runs"]
    for r in runs:
        if "error" not in r:
            r.setdefault("all_tokens_per_s", round(r["tokens"] / r["train_s"], 1))
    tools = list(dict.fromkeys(r["tool"] for r in runs))
    cases = list(dict.fromkeys(r["case"] for r in runs))
    summary = summarise(runs, tools, cases)
    print(f"{path}: {result.get('fixture')} fixture, commit {result.get('commit')}, "
          f"{result.get('date')}, load {result.get('loadavg_before')} before")  # fmt: skip
    print_tables(summary, ratios(summary, cases), [t for t in tools if t != "lockstep"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument(
        "--fixture",
        choices=list(FIXTURES),
        default="small",
        help="small: the original fixture; realistic: chat-length records, a 32k-vocabulary "
        "58M Llama (see make_assets.py); the settings below default to the fixture's",
    )
    p.add_argument("--micro", type=int, help="micro-batch (samples per forward pass)")
    p.add_argument("--accum", type=int, help="gradient accumulation steps")
    p.add_argument("--pack-micro", type=int, help="micro-batch when packing (packed rows)")
    p.add_argument("--pack-accum", type=int, help="gradient accumulation steps when packing")
    p.add_argument("--max-length", type=int)
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
    p.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                   help="print the tables of an earlier results file again, then stop")  # fmt: skip
    p.add_argument("--out", type=Path, help="default: results.json (small), "
                   "results-realistic.json (realistic)")  # fmt: skip
    args = p.parse_args()
    if args.report:
        report(args.report)
        return
    fixture = FIXTURES[args.fixture]
    for key in ("micro", "accum", "pack_micro", "pack_accum", "max_length"):
        if getattr(args, key) is None:
            setattr(args, key, fixture[key])
    args.out = args.out or HERE / fixture["out"]

    t_start = time.perf_counter()
    ensure_lockstep()
    pys = {t: ensure_peer(t) for t in args.tools if t != "lockstep"}
    assets = WORK / fixture["assets"]
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
            "--fixture",
            args.fixture,
        ],
        check=True,
        env={**os.environ, **ENV},
    )
    longest = json.loads((assets / "assets.json").read_text())["summary"]["length_max"]
    if args.max_length < longest:
        sys.exit(
            f"vs_peers: --max-length {args.max_length} would cut records: the longest of the "
            f"{args.fixture} fixture has {longest} tokens; use --max-length {longest} or more"
        )
    vers = {
        "lockstep": versions(LOCKSTEP_PY, ["lockstep-finetune", "torch", "transformers", "peft"])
    }
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
                        f"RSS {row['peak_rss_mib']:,.0f} MiB, loss {row['final_loss']:.4f}, "
                        f"{row['achieved_gflops']:.1f} GFLOP/s = {row['peak_share']:.1%} of "
                        f"the {row['matmul_peak_gflops']:.1f} GFLOP/s matmul peak "
                        f"({row['matmul_peak']['threads']} threads; the run: "
                        f"{row.get('threads')})"
                    )

    summary = summarise(runs, args.tools, args.cases)
    ratio_rows = ratios(summary, args.cases)
    peers = [t for t in args.tools if t != "lockstep"]
    print_tables(summary, ratio_rows, peers)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    assets_info = json.loads((assets / "assets.json").read_text())
    result = {
        **where_and_when(load),
        "fixture": args.fixture,
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
