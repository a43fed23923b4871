"""The GPU check's cases: real `lockstep train` runs on one CUDA GPU, results in one folder.

    bash bench/gpu/check.sh     (installs the carried wheels, sets PYTHONPATH, then runs this)
    python bench/gpu/check.py [--out DIR] [--cases a,b] [--budget-s 420]

The default cases are CASES; `--cases bench` (alone or with others) runs BENCH instead: the 1B
packed benchmark of bench/gpu/run.py, lockstep against TRL with MFU, BENCH_STEPS steps each,
within its own limits (BENCH.limit_s in all, BENCH_RUN_LIMIT_S a tool); its rows join the
results (summary.txt: a second table).

Before the cases: a Llama-shaped model with random weights (hidden 1024, 8 layers, 16 heads,
4 KV heads, MLP 2816, the built-in tokenizer's 2048-token vocabulary: 92M parameters, saved in
bfloat16) and 600 generated alpaca records of about 80-1000 tokens, in bench/gpu/work/check/.

Every case runs `python -m lockstep train bench/gpu/check.yaml` with its overrides (CASES) and
its own output_dir, in a process group of its own, within its time limit and what is left of
the budget; a case that fails does not stop the next. What each case proves is its `what` line.
The results folder gets summary.json, summary.txt and logs.txt, rewritten after every case, so
a check stopped from outside keeps what it found. Exit 1 when a case did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASE = HERE / "check.yaml"
WORK = HERE / "work" / "check"
MODEL, DATA = WORK / "model", WORK / "alpaca.jsonl"  # where check.yaml points
RESULTS = HERE / "work" / "check-results"
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=4096,
             tie_word_embeddings=True)  # fmt: skip
BUDGET_S = 420  # for the cases; the start and the model build come on top: 8 minutes in all
LOG_HEAD, LOG_TAIL, ERROR_LINES, LINE_CHARS = 8, 40, 15, 600
PACKED = ("data.packing=true", "batch.global_size=8", "batch.micro_size=2")  # 2 rows a pass
BENCH_STEPS, BENCH_RUN_LIMIT_S = 10, 200  # the benchmark in the check (run.py); each tool also
# gets at most an equal share of the time left (run.py, run_limit), so lockstep leaves TRL half


@dataclass(frozen=True)
class Run:
    """One `lockstep train` of a case: its overrides, its folder, the exit it should have."""

    overrides: tuple[str, ...]
    folder: str
    expect_fail: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    limit_s: int
    runs: tuple[Run, ...]
    extra: str = ""
    """A check after the runs: isolation | resume | resume_memory | lower_memory (judge);
    bench: no runs of check.yaml, bench/gpu/run.py instead (run_bench)."""


def _resume_runs(*overrides: str) -> tuple[Run, ...]:
    """Uninterrupted to step 4; then stopped by an injected error after the checkpoint of step
    2 and resumed in the same folder (checkpoint.resume=auto) to step 4."""
    common = (*overrides, "train.max_steps=4", "checkpoint.every_steps=2")
    return (
        Run(common, "reference"),
        Run((*common, "testing.fail_at_step=3"), "resumed", expect_fail=True),
        Run(common, "resumed"),
    )


CASES = (
    Case("bf16", "full fine-tuning, bf16 compute with float32 master weights (autocast)", 75,
         (Run(("finetune.method=full",), "run"),)),
    Case("packing", "packed 1024-token rows, 2 rows a micro-batch, the varlen attention "
         "lockstep picks; then packed logits = each sample's logits alone (isolation.py)", 150,
         (Run(PACKED, "run"),), "isolation"),
    Case("lora", "LoRA on every linear layer, bf16", 60, (Run(("finetune.method=lora",), "run"),)),
    Case("qlora", "QLoRA: 4-bit NF4 base weights (bitsandbytes), LoRA adapters", 75,
         (Run(("finetune.method=lora", "finetune.lora.quantize=4bit"), "run"),)),
    Case("fsdp_lora_resume", "train.strategy=fsdp on one process with LoRA: checkpoint at step "
         "2, stopped by an error at 3, resumed; losses of steps 3-4 = the uninterrupted run's", 120,
         _resume_runs("train.strategy=fsdp", "finetune.method=lora"), "resume"),
    Case("resume_memory", "a train.strategy=ddp checkpoint resumed: peak GPU memory of the "
         "first step after loading the optimizer state vs that step in a run that did not stop",
         90,
         _resume_runs("finetune.method=full"), "resume_memory"),
    Case("grad_ckpt", "train.gradient_checkpointing: lower peak GPU memory than the bf16 case",
         60, (Run(("train.gradient_checkpointing=true",), "run"),), "lower_memory"),
    Case("compile", "train.compile (each block compiled) on packed rows", 150,
         (Run((*PACKED, "train.compile=true"), "run"),)),
)  # fmt: skip
BENCH = Case("bench", "the 1B Llama-shaped packed benchmark (bench/gpu/run.py): lockstep and "
             "TRL's SFTTrainer, same settings; tokens/s/GPU, MFU, peak GPU memory", 360, (),
             "bench")  # fmt: skip


@dataclass
class Result:
    name: str
    what: str
    status: str = "failed"  # ok | failed | skipped
    seconds: float = 0.0
    tokens_per_s: float | None = None
    peak_mem_gib: float | None = None
    final_loss: float | None = None
    details: dict = field(default_factory=dict)
    error: str = ""
    log: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "log"}


# ---------------------------------------------------------------- running


def command(case: Case, run: Run, base: Path = BASE, work: Path = WORK) -> list[str]:
    """The `lockstep train` command line of one run of a case."""
    out = work / "runs" / case.name / run.folder
    return [sys.executable, "-m", "lockstep", "train", str(base), f"output_dir={out}",
            *run.overrides]  # fmt: skip


def run_command(argv: list[str], timeout_s: float, log: list[str]) -> tuple[int | None, str]:
    """Run argv in its own process group; on timeout the whole group is killed. Returns the exit
    code (None on timeout) and its output; `log` gets the command and a short version."""
    log.append("$ " + " ".join(argv))
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(timeout_s, 1))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    lines = clipped(output.splitlines())
    if len(lines) > LOG_HEAD + LOG_TAIL:
        skipped = len(lines) - LOG_HEAD - LOG_TAIL
        lines = [*lines[:LOG_HEAD], f"... ({skipped} lines)", *lines[-LOG_TAIL:]]
    took = time.perf_counter() - t0
    end = f"timed out after {timeout_s:.0f}s" if code is None else f"exit {code}"
    log.extend([*lines, f"[{end}, {took:.1f}s]"])
    return code, output


def clipped(lines: list[str]) -> list[str]:
    """Lines cut to LINE_CHARS (an error can name hundreds of parameters on one line)."""
    return [x if len(x) <= LINE_CHARS else x[:LINE_CHARS] + f" ... (+{len(x) - LINE_CHARS})"
            for x in lines]  # fmt: skip


def last_lines(output: str, n: int = ERROR_LINES) -> str:
    return "\n".join(clipped(output.strip().splitlines()[-n:]))


def metrics(folder: Path) -> list[dict]:
    """The training rows of a run's metrics.jsonl (none if it wrote no file)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss" in r]


def fill_from_metrics(result: Result, rows: list[dict]) -> None:
    """tokens/s (median after the first, warm-up, step), peak GPU memory, final loss."""
    if not rows:
        return
    timed = rows[1:] or rows
    result.tokens_per_s = round(statistics.median(r["tokens_per_s"] for r in timed), 1)
    peaks = [r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r]
    result.peak_mem_gib = max(peaks) if peaks else None
    result.final_loss = rows[-1]["loss"]


def run_case(
    case: Case, limit_s: float, done: dict[str, Result], base: Path = BASE, work: Path = WORK
) -> Result:
    """All runs of a case (in a fresh work/runs/CASE/), then its verdict (judge); never raises."""
    result = Result(case.name, case.what)
    deadline = time.perf_counter() + limit_s
    t0 = time.perf_counter()
    try:
        shutil.rmtree(work / "runs" / case.name, ignore_errors=True)
        for run in case.runs:
            left = deadline - time.perf_counter()
            code, output = run_command(command(case, run, base, work), left, result.log)
            if code is None:
                result.error = f"timed out ({case.limit_s}s limit)\n" + last_lines(output)
                return result
            if (code != 0) != run.expect_fail:
                want = "to stop at the injected failure" if run.expect_fail else "exit 0"
                result.error = f"expected {want}, got exit {code}\n" + last_lines(output)
                return result
        fill_from_metrics(result, metrics(work / "runs" / case.name / case.runs[-1].folder))
        judge(case, result, deadline, done, base, work)
    except Exception as e:  # a bug in a verdict must not cost the other cases
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
    finally:
        result.seconds = round(time.perf_counter() - t0, 1)
    return result


def bench_command(limit_s: float, report: Path) -> list[str]:
    """run.py's command line inside the check: BENCH_STEPS steps, the case's time (less a margin
    for writing the report) as the benchmark's limit, BENCH_RUN_LIMIT_S for each tool."""
    return [sys.executable, str(HERE / "run.py"), f"--steps={BENCH_STEPS}",
            f"--limit-s={max(limit_s - 15, 1):.0f}", f"--run-limit-s={BENCH_RUN_LIMIT_S}",
            f"--json={report}"]  # fmt: skip


def run_bench(case: Case, limit_s: float, work: Path = WORK) -> Result:
    """The benchmark case: run.py within limit_s, its report judged by bench_verdict."""
    result = Result(case.name, case.what)
    report = work / "bench.json"
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    code, output = run_command(bench_command(limit_s, report), limit_s, result.log)
    result.seconds = round(time.perf_counter() - t0, 1)
    if report.is_file():
        bench_verdict(result, json.loads(report.read_text()))
    else:
        why = f"timed out ({limit_s:.0f}s limit)" if code is None else f"exit {code}"
        result.error = f"run.py wrote no report: {why}\n" + last_lines(output)
    return result


def bench_verdict(result: Result, report: dict) -> None:
    """ok when lockstep's row is; the result takes lockstep's tokens/s, memory and loss, the
    report goes into details; a TRL row that did not pass is named in the error."""
    result.details["bench"] = report
    rows = {r["tool"]: r for r in report["rows"]}
    ours = rows.get("lockstep", {"error": "no lockstep row"})
    result.tokens_per_s = ours.get("tokens_per_s")
    result.peak_mem_gib = ours.get("peak_mem_gib")
    result.final_loss = ours.get("final_loss")
    result.status = "ok" if ours.get("status") == "ok" else "failed"
    notes = [f"{tool}: {r['error']}" for tool, r in rows.items() if r.get("error")]
    result.error = "\n".join(notes)


def bench_table(report: dict) -> list[str]:
    """The benchmark's rows as a table: per tool tokens/s/GPU, MFU, peak GPU memory, loss; then
    lockstep / TRL tokens/s, or why a row has no numbers."""
    peak = report.get("peak_tflops")
    lines = [f"1B packed benchmark on {report['gpu']}: {report['steps']} steps, "
             f"{report['flops_per_token'] / 1e9:.2f} GFLOP/token, bf16 peak "
             + (f"{peak} TFLOP/s" if peak else "unknown (no MFU)"),
             f"{'tool':<10}{'status':<11}{'tokens/s/GPU':>14}{'MFU':>8}{'peak GiB':>10}"
             f"{'loss':>8}"]  # fmt: skip
    for r in report["rows"]:
        tps, mfu, mem, loss = (r.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_gib",
                                                  "final_loss"))  # fmt: skip
        lines.append(f"{r['tool']:<10}{r['status']:<11}"
                     + (f"{tps:>14,.0f}" if tps else f"{'-':>14}")
                     + (f"{mfu:>8.1%}" if mfu is not None else f"{'-':>8}")
                     + (f"{mem:>10.2f}" if mem is not None else f"{'-':>10}")
                     + (f"{loss:>8.3f}" if loss is not None else f"{'-':>8}"))  # fmt: skip
    ratio = report.get("lockstep_over_trl")
    lines.append(f"lockstep / trl tokens/s: {ratio:.2f}x" if ratio else
                 "lockstep / trl tokens/s: - (a row without tokens/s)")  # fmt: skip
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"    {r['tool']}: {r['error'].splitlines()[0]}")
    return lines


# ---------------------------------------------------------------- verdicts


def judge(
    case: Case, result: Result, deadline: float, done: dict[str, Result], base: Path, work: Path
) -> None:
    """Set result.status from what the runs left; the extra checks of some cases."""
    folder = work / "runs" / case.name
    rows = metrics(folder / case.runs[-1].folder)
    if not rows:
        result.error = "no training rows in metrics.jsonl"
        return
    if not (folder / case.runs[-1].folder / "final").is_dir():
        result.error = "no final/ model folder"
        return
    result.status = "ok"
    if case.extra == "isolation":
        isolation(result, deadline, base, folder)
    elif case.extra in ("resume", "resume_memory"):
        resume(result, metrics(folder / "reference"), rows, case.extra == "resume_memory")
    elif case.extra == "lower_memory":
        lower_memory(result, done.get("bf16"))


def isolation(result: Result, deadline: float, base: Path, folder: Path) -> None:
    """Run isolation.py on the packing case's settings; its JSON goes into details."""
    report = folder / "isolation.json"
    argv = [sys.executable, str(HERE / "isolation.py"), str(base), *PACKED, "--json", str(report)]
    code, output = run_command(argv, deadline - time.perf_counter(), result.log)
    found = json.loads(report.read_text()) if report.is_file() else {}
    result.details["isolation"] = found.get("implementations", {})
    if code != 0 or not found.get("ok"):
        result.status = "failed"
        why = "timed out" if code is None else "packed logits differ from the samples' alone"
        result.error = f"isolation: {why}\n" + last_lines(output)


def resume(result: Result, reference: list[dict], resumed: list[dict], memory: bool) -> None:
    """Losses of the resumed steps vs the uninterrupted run; with `memory`, peak GPU memory."""
    by_step = {r["step"]: r for r in reference}
    after = [r for r in resumed if r["step"] > 2]
    diffs = [abs(r["loss"] - by_step[r["step"]]["loss"]) / abs(by_step[r["step"]]["loss"])
             for r in after if r["step"] in by_step]  # fmt: skip
    result.details["resumed_steps"] = [r["step"] for r in after]
    result.details["resumed_loss_rel_diff"] = max(diffs) if diffs else None
    if not diffs or max(diffs) > 0.02:
        result.status = "failed"
        result.error = f"resumed losses differ from the uninterrupted run's by {diffs} (> 2%)"
        return
    if memory:
        # peak_mem_gib is the peak of the process so far: steps 1-3 there, loading + step 3 here
        ref_peak = by_step.get(3, {}).get("peak_mem_gib")
        res_peak = after[0].get("peak_mem_gib")
        result.details.update(
            fresh_start_peak_gib_step1=by_step.get(1, {}).get("peak_mem_gib"),
            uninterrupted_peak_gib_step3=ref_peak,
            resumed_peak_gib_step3=res_peak,
        )
        if ref_peak is None or res_peak is None:
            result.status, result.error = "failed", "no peak_mem_gib in metrics.jsonl"
        elif res_peak > 1.10 * ref_peak + 0.25:
            result.status = "failed"
            result.error = (f"resuming took {res_peak:.2f} GiB at its first step, the run that "
                            f"did not stop {ref_peak:.2f} GiB (allowed: 10% + 0.25 GiB more)")  # fmt: skip


def lower_memory(result: Result, plain: Result | None) -> None:
    """Gradient checkpointing must lower the peak memory of the same run without it."""
    if plain is None or plain.status != "ok" or plain.peak_mem_gib is None:
        result.details["compared_with"] = "nothing: the bf16 case did not pass"
        return
    result.details["bf16_peak_mem_gib"] = plain.peak_mem_gib
    if result.peak_mem_gib is None or result.peak_mem_gib >= plain.peak_mem_gib:
        result.status = "failed"
        result.error = (f"peak memory {result.peak_mem_gib} GiB with gradient checkpointing, "
                        f"{plain.peak_mem_gib} GiB without")  # fmt: skip


# ---------------------------------------------------------------- setup and report


def vocab_words(tok) -> list[str]:
    """Whole words of a byte-level BPE vocabulary (Ġ, a space, stripped): text to make data of."""
    pieces = {w.lstrip("\u0120") for w in tok.get_vocab()}
    return sorted(w for w in pieces if w.isascii() and w.isalpha() and len(w) > 2)


def build_assets(device: str = "cuda") -> dict:
    """The random model and the data check.yaml points to; made once, kept for reruns."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "src/lockstep/model/builtin/tiny")
    if not (MODEL / "config.json").is_file():
        cfg = LlamaConfig(**SHAPE, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(MODEL)
        tok.save_pretrained(MODEL)
        del model
    if not DATA.is_file():
        words = vocab_words(tok)
        rng = random.Random(0)
        lines = []
        for _ in range(600):
            out = " ".join(rng.choices(words, k=rng.randint(30, 600)))
            lines.append(json.dumps({"instruction": "Continue the text.",
                                     "input": " ".join(rng.choices(words, k=20)),
                                     "output": out}))  # fmt: skip
        DATA.write_text("\n".join(lines) + "\n")
    return {"model": str(MODEL), "data": str(DATA), "shape": SHAPE, "vocab": len(tok),
            "records": 600}  # fmt: skip


ENV_SNIPPET = """
import importlib, json, sys, torch
gpu = torch.cuda.is_available()
out = {"python": sys.version.split()[0], "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if gpu else None,
       "capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None}
for name in ("torch", "transformers", "peft", "pydantic", "datasets", "bitsandbytes",
             "flash_attn", "safetensors", "accelerate", "trl", "lockstep"):
    try:
        out[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        out[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
print(json.dumps(out))
"""


NEEDED = ("torch", "transformers", "peft", "pydantic", "datasets", "bitsandbytes", "lockstep")


def imports_result(env: dict, seconds: float) -> Result:
    """The first case: every package lockstep needs imports (flash-attn is optional)."""
    result = Result("imports", "the packages lockstep needs import: " + ", ".join(NEEDED),
                    seconds=round(seconds, 1), details=env)  # fmt: skip
    broken = [f"{n}: {env.get(n, 'not checked')}" for n in NEEDED
              if str(env.get(n, "not checked")).startswith("not ")]  # fmt: skip
    if "error" in env or broken:
        result.error = env.get("error") or "\n".join(broken)
    else:
        result.status = "ok"
    return result


def environment(log: list[str]) -> dict:
    """Versions the GPU machine has, as a subprocess sees them (PYTHONPATH included)."""
    code, output = run_command([sys.executable, "-c", ENV_SNIPPET], 120, log)
    try:
        return json.loads(output.strip().splitlines()[-1]) if code == 0 else {"error": output}
    except (json.JSONDecodeError, IndexError):
        return {"error": last_lines(output)}


def write_results(out: Path, head: dict, results: list[Result], setup_log: list[str]) -> None:
    """summary.json, summary.txt and logs.txt (3 files: the device tool returns at most 8)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {**head, "ok": bool(results) and all(r.status == "ok" for r in results),
               "cases": [r.summary() for r in results]}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = [f"{'case':<18}{'status':<9}{'s':>7}{'tokens/s':>11}{'peak GiB':>10}{'loss':>8}"]
    for r in results:
        tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-"
        mem = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "-"
        loss = f"{r.final_loss:.3f}" if r.final_loss is not None else "-"
        table.append(f"{r.name:<18}{r.status:<9}{r.seconds:>7.1f}{tps:>11}{mem:>10}{loss:>8}")
        if r.error:
            table.append("    " + r.error.splitlines()[0])
    env = head.get("env", {})
    top = f"{env.get('gpu', '?')}; torch {env.get('torch', '?')}, transformers " \
          f"{env.get('transformers', '?')}; {head.get('wall_s', 0):.0f}s"  # fmt: skip
    for r in results:
        if "bench" in r.details:
            table += ["", *r.details["bench"]["table"]]
    (out / "summary.txt").write_text("\n".join([top, *table]) + "\n")
    sections = []
    for r in results:
        sections += [f"===== {r.name}: {r.status} ({r.seconds}s) — {r.what}", *r.log, ""]
    (out / "logs.txt").write_text("\n".join(["===== setup", *setup_log, "", *sections]) + "\n")


def selected(names: str | None) -> tuple[Case, ...]:
    """The cases --cases names, in their order of CASES + BENCH; none named: CASES."""
    if not names:
        return CASES
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    every = (*CASES, BENCH)
    unknown = [n for n in wanted if n not in {c.name for c in every}]
    if unknown:
        raise SystemExit(f"check.py: unknown case(s) {', '.join(unknown)}; the cases: "
                         + ", ".join(c.name for c in every))  # fmt: skip
    return tuple(c for c in every if c.name in wanted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the results folder (default: $OUT when set, else " + str(RESULTS) + ")",
    )
    ap.add_argument("--cases", default=None,
                    help="comma-separated names (default: all but bench)")  # fmt: skip
    ap.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="seconds for all cases together; later cases are skipped past it",
    )
    args = ap.parse_args(argv)  # fmt: skip
    cases = selected(args.cases)
    out = args.out or Path(os.environ.get("OUT") or RESULTS)
    import torch

    if not torch.cuda.is_available():
        print("check.py: no CUDA device visible; run the GPU check on a GPU machine",
              file=sys.stderr)  # fmt: skip
        return 2
    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    setup_log: list[str] = []
    head: dict = {"budget_s": args.budget_s}
    head["env"] = environment(setup_log)
    results: list[Result] = [imports_result(head["env"], time.perf_counter() - t0)]
    print(f"[check] imports: {results[0].status} {results[0].error}".rstrip(), flush=True)
    write_results(out, head, results, setup_log)
    try:
        head["assets"] = build_assets()
    except Exception as e:
        head["setup_error"] = f"{type(e).__name__}: {e}"
        write_results(out, head, results, setup_log)
        print(f"check.py: building the model and data failed: {e}", file=sys.stderr)
        return 1
    head["setup_s"] = round(time.perf_counter() - t0, 1)
    budget_end = time.perf_counter() + args.budget_s
    done: dict[str, Result] = {}
    for case in cases:
        left = budget_end - time.perf_counter()
        if left < 20:
            result = Result(case.name, case.what, "skipped", error="the check's budget ran out")
        else:
            print(f"[check] {case.name}: {case.what}", flush=True)
            limit = min(case.limit_s, left)
            result = (
                run_bench(case, limit) if case.extra == "bench" else run_case(case, limit, done)
            )
        done[case.name] = result
        results.append(result)
        print(f"[check] {case.name}: {result.status} in {result.seconds}s"
              + (f" — {result.error.splitlines()[0]}" if result.error else ""), flush=True)  # fmt: skip
        head["wall_s"] = round(time.perf_counter() - t0, 1)
        write_results(out, head, results, setup_log)
    print((out / "summary.txt").read_text(), end="")
    print(f"[check] results in {out}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
