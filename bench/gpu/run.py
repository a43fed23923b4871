"""lockstep on one CUDA GPU: a ~1B-parameter Llama-shaped model, 4096-token packed sequences, bf16.

    python3 bench/gpu/run.py [--steps 30] [--peer-python PATH] [--limit-s S] [--run-limit-s S]
                             [--no-compile] [--lockstep-set KEY=VALUE]
                             [--json PATH]

Reports tokens/s/GPU, peak GPU memory and MFU for lockstep, and for TRL's SFTTrainer under the
same settings (bench/gpu/trl_gpu.py) in the Python given by --peer-python (default: this one);
TRL's row says "skipped: <why>" when that Python cannot import trl. Prints a table and writes
the report as JSON (default bench/gpu/work/results.json). `bash bench/gpu/check.sh --cases bench`
runs it inside the GPU check, with fewer steps and time limits (check.py, BENCH_*).

Time limits: --limit-s is the whole benchmark's (model build included); each tool's run gets at
most --run-limit-s and a fair share of what is left, and is killed with its children past it
(its row: "timed out"), so a slow tool cannot take the other's time.

Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab
128256, tied embeddings), random weights, saved in bfloat16. Data: generated alpaca records of
about 100-1300 tokens (the built-in tokenizer), packed into 4096-token rows; global batch 16
rows, micro-batch 2 (accumulation 8), full fine-tuning, AdamW, bf16 compute with float32 master
weights, compiled (lockstep: each block; TRL: the model). The timed window is the last two
thirds of the steps (compilation and warm-up are in the first third).

MFU = (model FLOPs per token x tokens/s) / peak dense bf16 FLOP/s of the GPU (PEAK_TFLOPS;
H100/H200 SXM 989.4 TFLOP/s). FLOPs per trained token = 6 N + 6 L d S: N the weights of the
matmuls a token goes through (blocks + LM head; not the input embedding), L layers, d the hidden
size, S the mean number of positions a token's sample spans, weighted by tokens (sum n^2 / sum n
over the samples' lengths n: packed samples attend only within themselves). 12 L d S would be
non-causal attention's forward + backward (QK^T and AV, 2 d FLOPs per pair each, x3 with the
backward); causal attention does half. Tokens/s counts every token of the rows (no padding), the
same definition for both tools.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from check import ROOT, bench_table, last_lines, run_command, vocab_words

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
REPORT = WORK / "results.json"
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
             max_position_embeddings=8192, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})  # fmt: skip
# Dense bf16 peak (no sparsity) by a name the GPU reports; the first match counts.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0),
               ("L40S", 362.0))  # fmt: skip
SEQ, GLOBAL, MICRO = 4096, 16, 2
RECORDS = 6000  # about 4M tokens: 60 steps of 16 x 4096-token rows
LENGTH_SAMPLE = 300  # records tokenised to estimate the attention span
NO_LIMIT_S = 86400  # what "no limit" waits (the OS's wait takes no more than ~24 days)
MIN_RUN_S = 30  # a tool given less is skipped: it could not even load the model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each tool")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="the Python that runs TRL (default: this one)")  # fmt: skip
    ap.add_argument("--limit-s", type=float, default=None,
                    help="seconds for the whole benchmark (default: no limit)")  # fmt: skip
    ap.add_argument("--run-limit-s", type=float, default=None,
                    help="seconds for one tool's run (default: no limit)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=REPORT, help="where the report goes")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="both tools eager (default: both compiled)")  # fmt: skip
    ap.add_argument("--lockstep-set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override of lockstep's run (repeatable); TRL's run does not "
                         "follow it: the report lists it")  # fmt: skip
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error(f"--steps {args.steps}: the timed window is the last two thirds; use 3 or more")
    return args


def build_assets() -> tuple[Path, Path, float]:
    """The model folder, the data file, and the attention span S (see the module's docstring);
    made once, kept for reruns."""
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
        del model
    if not data.exists():
        words = vocab_words(tok)
        rng = random.Random(0)
        lines = [json.dumps({"instruction": "Continue the text.",
                             "input": " ".join(rng.choices(words, k=40)),
                             "output": " ".join(rng.choices(words, k=rng.randint(60, 1200)))})
                 for _ in range(RECORDS)]  # fmt: skip
        data.write_text("\n".join(lines) + "\n")
    sample = [json.loads(x) for x in data.read_text().splitlines()[:LENGTH_SAMPLE]]
    lens = [min(len(tok("\n".join(r.values()))["input_ids"]), SEQ) for r in sample]
    return model_dir, data, attention_span(lens)


def attention_span(lengths: list[int]) -> float:
    """The mean number of positions a token's sample spans, weighted by tokens: sum n^2 / sum n."""
    return sum(n * n for n in lengths) / sum(lengths)


def matmul_params() -> int:
    """N: the weights of the matmuls one token goes through (blocks and LM head)."""
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = d * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    block = d * d * 2 + d * kv * 2 + 3 * d * f  # q and o, k and v, gate/up/down
    return SHAPE["num_hidden_layers"] * block + d * v


def flops_per_token(span: float) -> float:
    """Model FLOPs of one trained token, forward and backward: 6 N + 6 L d S."""
    return 6 * matmul_params() + 6 * SHAPE["num_hidden_layers"] * SHAPE["hidden_size"] * span


def peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name; None for a GPU not in PEAK_TFLOPS."""
    return next((v for k, v in PEAK_TFLOPS if k in gpu_name), None)


def run_limit(deadline: float | None, per_run: float | None, runs_left: int) -> float | None:
    """Seconds the next tool may run: its own limit and an equal share, with the runs still to
    come, of what the benchmark has left (None: no limit)."""
    limits = [x for x in (per_run,) if x is not None]
    if deadline is not None:
        limits.append((deadline - time.perf_counter()) / runs_left)
    return max(min(limits), 0.0) if limits else None


def timed_rate(points: list[tuple[float, int]]) -> float:
    """Tokens/s over the last two thirds of the steps, from (seconds, tokens) at each step's end:
    from the end of step len // 3 to the end of the last step."""
    start = points[len(points) // 3 - 1]
    return (points[-1][1] - start[1]) / (points[-1][0] - start[0])


def run_tool(tool: str, argv: list[str], limit_s: float | None) -> tuple[dict, str]:
    """Run one tool's training, killed with its children past limit_s. Returns its row (status
    failed / timed out, with the error's last lines, unless it exited 0; skipped when limit_s is
    under MIN_RUN_S) and its output."""
    if limit_s is not None and limit_s < MIN_RUN_S:
        return {
            "tool": tool,
            "status": "skipped",
            "error": f"skipped: the benchmark's time ran out ({limit_s:.0f}s left)",
        }, ""
    log: list[str] = []
    t0 = time.perf_counter()
    code, output = run_command(argv, limit_s if limit_s is not None else NO_LIMIT_S, log)
    row = {"tool": tool, "status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}
    if code is None:
        row.update(status="timed out", error=f"timed out ({limit_s:.0f}s limit)\n"
                   + last_lines(output))  # fmt: skip
    elif code != 0:
        row.update(status="failed", error=f"exit {code}\n" + last_lines(output))
    return row, output


def run_lockstep(
    model_dir: Path,
    data: Path,
    steps: int,
    limit_s: float | None,
    extra: tuple[str, ...] | list[str] = (),
    out: Path = WORK / "lockstep-run",
) -> dict:
    """lockstep's row: `lockstep train bench/gpu/lockstep.yaml` with run.py's overrides and
    `extra`, its tokens/s (timed_rate), peak GPU memory and final loss from metrics.jsonl."""
    argv = [sys.executable, "-m", "lockstep", "train", str(HERE / "lockstep.yaml"),
            *lockstep_overrides(out, model_dir, data, steps), *extra]  # fmt: skip
    row, _ = run_tool("lockstep", argv, limit_s)
    if row["status"] != "ok":
        return row
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    points, total = [], 0
    for r in rows:
        total += r["tokens"]
        points.append((r["elapsed_s"], total))
    return {**row, "tokens_per_s": timed_rate(points),
            "peak_mem_gib": max((r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r),
                                default=None),
            "final_loss": rows[-1]["loss"]}  # fmt: skip


def lockstep_overrides(out: Path, model_dir: Path, data: Path, steps: int) -> list[str]:
    """What run.py sets on bench/gpu/lockstep.yaml."""
    return [f"output_dir={out}", f"model.path={model_dir}", f"data.train.0.path={data}",
            f"train.max_steps={steps}"]  # fmt: skip


def trl_missing(python: str) -> str | None:
    """Why `python` cannot import trl (its error's last line), or None when it can."""
    try:
        probe = subprocess.run([python, "-c", "import trl"], capture_output=True, text=True,
                               timeout=180)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]


def run_trl(
    python: str,
    model_dir: Path,
    data: Path,
    steps: int,
    limit_s: float | None,
    compiled: bool = True,
) -> dict:
    """TRL's row: trl_gpu.py in `python`, or "skipped" with the reason it cannot import trl."""
    why = trl_missing(python)
    if why is not None:
        return {"tool": "trl", "status": "skipped",
                "error": f"skipped: {python} cannot import trl ({why}); bring its wheel: "
                         "bash bench/gpu/check.sh --prepare (bench/gpu/wheels.txt)"}  # fmt: skip
    out = WORK / "trl-run.json"
    out.unlink(missing_ok=True)
    argv = [python, str(HERE / "trl_gpu.py"), str(model_dir), str(data), str(out),
            f"--steps={steps}", f"--seq={SEQ}", f"--micro={MICRO}",
            f"--accumulation={GLOBAL // MICRO}", *([] if compiled else ["--no-compile"])]  # fmt: skip
    row, _ = run_tool("trl", argv, limit_s)
    return {**row, **json.loads(out.read_text())} if row["status"] == "ok" else row


def report(gpu: str, span: float, steps: int, rows: list[dict]) -> dict:
    """The benchmark's results: rows with MFU, lockstep / TRL tokens/s, the table's lines."""
    peak, fpt = peak_tflops(gpu), flops_per_token(span)
    for r in rows:
        tps = r.get("tokens_per_s")
        r["mfu"] = fpt * tps / (peak * 1e12) if peak and tps else None
    by_tool = {r["tool"]: r for r in rows if r.get("tokens_per_s")}
    ratio = None
    if "lockstep" in by_tool and "trl" in by_tool:
        ratio = by_tool["lockstep"]["tokens_per_s"] / by_tool["trl"]["tokens_per_s"]
    out = {"gpu": gpu, "peak_tflops": peak, "flops_per_token": fpt, "matmul_params":
           matmul_params(), "attention_span": span, "steps": steps,
           "settings": {"seq": SEQ, "global_rows": GLOBAL, "micro_rows": MICRO, "shape": SHAPE},
           "rows": rows, "lockstep_over_trl": ratio}  # fmt: skip
    out["table"] = bench_table(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("run.py: the GPU benchmark needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    deadline = None if args.limit_s is None else time.perf_counter() + args.limit_s
    WORK.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    model_dir, data, span = build_assets()
    print(f"[bench] model and data ready; lockstep: {args.steps} steps", flush=True)
    limit = run_limit(deadline, args.run_limit_s, 2)
    eager = [] if args.compile else ["train.compile=false"]
    rows = [run_lockstep(model_dir, data, args.steps, limit, [*eager, *args.lockstep_set])]
    print(f"[bench] lockstep: {rows[0]['status']}", flush=True)
    limit = run_limit(deadline, args.run_limit_s, 1)
    rows.append(run_trl(args.peer_python, model_dir, data, args.steps, limit, args.compile))
    print(f"[bench] trl: {rows[1]['status']}", flush=True)
    result = report(gpu, span, args.steps, rows)
    result.update(compiled=args.compile, lockstep_set=args.lockstep_set)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        if r.get("error"):
            print(f"===== {r['tool']}: {r['error']}")
    print("\n".join(result["table"]))
    return 0 if rows[0]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
