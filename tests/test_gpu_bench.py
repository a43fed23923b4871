"""The 1B packed benchmark inside the GPU check (`check.sh --cases bench`, bench/gpu/run.py), on
this CPU: the case and its limits, the rows of a tool that is missing, fails or has no time left,
the MFU formula against a count from the model itself, and the report in the results folder
(recorded rows stand in for a GPU's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lockstep import config

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
DEMO_DATA = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_train.jsonl"
H200 = "NVIDIA H200"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_bench_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    sys.path.insert(0, str(GPU))  # run.py takes its helpers from check.py, its neighbour
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(GPU))
    return mod


check = _module("check")
bench = _module("run")


def hand_matmul_params() -> int:
    """N counted from the model itself (meta device): every Linear of the blocks + the LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**bench.SHAPE))
    blocks = sum(m.weight.numel() for m in model.model.layers.modules()
                 if isinstance(m, torch.nn.Linear))  # fmt: skip
    return blocks + model.lm_head.weight.numel()


def recorded_rows(trl: dict | None = None) -> list[dict]:
    """Rows as run.py records them on a GPU (numbers made up, shapes real)."""
    ours = {"tool": "lockstep", "status": "ok", "wall_s": 95.0, "tokens_per_s": 36000.0,
            "peak_mem_gib": 41.5, "final_loss": 11.2}  # fmt: skip
    theirs = trl or {"tool": "trl", "status": "ok", "wall_s": 120.0, "tokens_per_s": 24000.0,
                     "peak_mem_gib": 52.25, "final_loss": 11.3}  # fmt: skip
    return [ours, theirs]


def test_the_bench_case_runs_when_named_and_its_wheels_are_pinned():
    assert check.BENCH not in check.selected(None)  # the default check is unchanged
    assert check.selected("bench") == (check.BENCH,)
    assert check.selected("bench,packing") == (check.selected("packing")[0], check.BENCH)
    with pytest.raises(SystemExit, match="bench"):  # the unknown-case message lists it
        check.selected("nope")
    pinned = [line.split("==")[0] for line in (GPU / "wheels.txt").read_text().splitlines()]
    assert "trl" in pinned and "accelerate" in pinned


def test_the_bench_command_passes_its_limits_to_run_py(tmp_path):
    argv = check.bench_command(check.BENCH.limit_s, tmp_path / "bench.json")
    assert argv[:2] == [sys.executable, str(GPU / "run.py")]
    args = bench.parse_args(argv[2:])
    assert args.steps == check.BENCH_STEPS and args.json == tmp_path / "bench.json"
    assert args.run_limit_s == check.BENCH_RUN_LIMIT_S
    assert args.limit_s < check.BENCH.limit_s  # run.py ends before the case is killed
    assert check.BENCH.limit_s > check.BENCH_RUN_LIMIT_S  # the first tool: half of what is left
    assert check.BENCH.limit_s + 60 <= 600  # one device command, with the setup before it
    short = bench.parse_args(check.bench_command(100, tmp_path / "b.json")[2:])
    assert short.limit_s < 100  # a smaller budget left shrinks the benchmark's limit
    assert args.compile and not bench.parse_args(["--no-compile"]).compile


def test_each_tool_gets_its_limit_and_a_fair_share_of_what_is_left():
    assert bench.run_limit(None, None, 2) is None
    assert bench.run_limit(None, 160, 2) == 160
    soon = time.perf_counter() + 100
    assert 49 < bench.run_limit(soon, 160, 2) <= 50  # lockstep leaves half for TRL
    assert 99 < bench.run_limit(soon, 160, 1) <= 100  # TRL, last, takes what is left
    assert bench.run_limit(soon, 30, 2) == 30
    assert bench.run_limit(time.perf_counter() - 5, 160, 1) == 0.0


def test_a_tool_without_time_is_skipped_and_one_that_fails_is_failed(tmp_path):
    marker = tmp_path / "ran"
    write = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    row, _ = bench.run_tool("trl", write, bench.MIN_RUN_S - 1)
    assert row["status"] == "skipped" and "time ran out" in row["error"]
    assert not marker.exists()
    row, _ = bench.run_tool("trl", write, bench.MIN_RUN_S)
    assert row["status"] == "ok" and marker.exists()
    crash = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    row, output = bench.run_tool("lockstep", crash, None)
    assert row["status"] == "failed" and row["error"].splitlines() == ["exit 3", "boom"]


def test_a_python_without_trl_gives_a_skipped_row_with_the_reason(tmp_path):
    # this Python without its site-packages (-S): trl cannot be imported, installed here or not
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    row = bench.run_trl(str(bare), tmp_path, tmp_path / "d.jsonl", 10, 100)
    assert row["status"] == "skipped" and "tokens_per_s" not in row
    assert row["error"].startswith(f"skipped: {bare} cannot import trl (")
    assert "No module named 'trl'" in row["error"] and "check.sh --prepare" in row["error"]
    # a Python that has it (here: a stand-in trl package on its path) is asked to run it
    fake = tmp_path / "site" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    python = tmp_path / "python-with-trl"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={fake.parent} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert bench.trl_missing(str(python)) is None
    assert bench.trl_missing(str(tmp_path / "no-such-python")).startswith("FileNotFoundError")


def test_mfu_formula_against_the_model_shape():
    n = hand_matmul_params()
    assert bench.matmul_params() == n
    d, layers = bench.SHAPE["hidden_size"], bench.SHAPE["num_hidden_layers"]
    lengths = [100, 300, 1000]
    # causal attention, by positions: the token at i of a sample attends i positions; QK^T and
    # AV cost 2 d FLOPs per pair each, and the backward twice the forward
    pairs = sum(i for length in lengths for i in range(1, length + 1))
    attention = 3 * 2 * (2 * d) * pairs * layers / sum(lengths)
    span = bench.attention_span(lengths)
    assert span == pytest.approx((100**2 + 300**2 + 1000**2) / 1400)
    assert bench.flops_per_token(span) == pytest.approx(6 * n + attention, rel=1e-3)
    assert 1.2e9 < n < 1.3e9  # Llama-3.2-1B without its input embedding
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM part's
    assert bench.peak_tflops("Some GPU") is None
    rows = bench.report(H200, span, 10, recorded_rows())["rows"]
    mfu = (6 * n + attention) * 36000.0 / 989.4e12
    assert rows[0]["mfu"] == pytest.approx(mfu, rel=1e-3)
    unknown = bench.report("Some GPU", span, 10, recorded_rows())
    assert unknown["rows"][0]["mfu"] is None and "no MFU" in unknown["table"][0]


def results_of(tmp_path: Path, rows: list[dict]) -> tuple[object, dict, str]:
    """The bench case judged on a report of recorded rows (as read back from run.py's JSON),
    written to the results folder with an `imports` case before it."""
    report = json.loads(json.dumps(bench.report(H200, 900.0, 10, rows)))
    result = check.Result("bench", check.BENCH.what, seconds=250.0)
    check.bench_verdict(result, report)
    imports = check.Result("imports", "", "ok", 2.0)
    check.write_results(tmp_path, {"env": {"gpu": H200}, "wall_s": 260}, [imports, result], [])
    return (
        result,
        json.loads((tmp_path / "summary.json").read_text()),
        (tmp_path / "summary.txt").read_text(),
    )


def test_the_results_carry_tokens_mfu_memory_and_the_ratio(tmp_path):
    result, summary, text = results_of(tmp_path, recorded_rows())
    assert result.status == "ok" and summary["ok"] is True and result.error == ""
    case = summary["cases"][1]
    assert case["tokens_per_s"] == 36000.0 and case["peak_mem_gib"] == 41.5
    bench_rows = case["details"]["bench"]["rows"]
    fpt = case["details"]["bench"]["flops_per_token"]
    assert [r["tool"] for r in bench_rows] == ["lockstep", "trl"]
    assert bench_rows[1]["mfu"] == pytest.approx(fpt * 24000.0 / 989.4e12)
    assert case["details"]["bench"]["lockstep_over_trl"] == pytest.approx(1.5)
    assert "MFU" in text and "tokens/s/GPU" in text and "peak GiB" in text
    lines = text.splitlines()
    ours = next(x for x in lines if x.startswith("lockstep  "))
    assert "36,000" in ours and f"{fpt * 36000.0 / 989.4e12:.1%}" in ours and "41.50" in ours
    theirs = next(x for x in lines if x.startswith("trl  "))
    assert "24,000" in theirs and "52.25" in theirs
    assert "lockstep / trl tokens/s: 1.50x" in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "summary.json",
                                                          "summary.txt"]  # fmt: skip


def test_a_skipped_trl_leaves_lockstep_row_and_says_why(tmp_path):
    why = "skipped: python3 cannot import trl (ModuleNotFoundError: No module named 'trl')"
    result, summary, text = results_of(
        tmp_path, recorded_rows({"tool": "trl", "status": "skipped", "error": why})
    )
    assert result.status == "ok" and summary["ok"] is True  # lockstep's row is the check's
    assert result.tokens_per_s == 36000.0
    assert next(x for x in text.splitlines() if x.startswith("trl  ")).split()[:2] == [
        "trl", "skipped"]  # fmt: skip
    assert f"    trl: {why}" in text.splitlines()
    assert "lockstep / trl tokens/s: -" in text
    failed, summary, text = results_of(
        tmp_path,
        [
            {"tool": "lockstep", "status": "timed out", "error": "timed out (160s limit)"},
            recorded_rows()[1],
        ],  # fmt: skip
    )
    assert failed.status == "failed" and summary["ok"] is False
    assert "lockstep: timed out (160s limit)" in text


def test_run_py_settings_are_a_valid_lockstep_config(tmp_path):
    out = tmp_path / "run"
    overrides = bench.lockstep_overrides(out, tmp_path / "model", DEMO_DATA, 10)
    cfg = config.load(GPU / "lockstep.yaml", overrides)
    config.check(cfg, 1)
    assert cfg.output_dir == str(out) and cfg.train.max_steps == 10
    assert cfg.data.packing and cfg.data.max_length == bench.SEQ
    assert (cfg.batch.global_size, cfg.batch.micro_size) == (bench.GLOBAL, bench.MICRO)
    assert cfg.train.compile


@pytest.mark.slow  # the default suite's 10 minutes; CI runs it
def test_lockstep_row_from_a_real_run(tmp_path):
    """run.py's lockstep run on this CPU, made small with --lockstep-set's overrides."""
    small = ["model.path=builtin:tiny", "data.max_length=64", "batch.global_size=4",
             "train.compile=false", "train.loss_chunk=null", f"data.cache_dir={tmp_path / 'c'}",
             "data.num_workers=0"]  # fmt: skip
    args = bench.parse_args(["--steps=4", *(f"--lockstep-set={x}" for x in small)])
    out = tmp_path / "run"
    row = bench.run_lockstep(Path("unused"), DEMO_DATA, args.steps, 240, args.lockstep_set, out)
    assert row["status"] == "ok", row.get("error")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    tokens = sum(m["tokens"] for m in steps[1:])  # the window: after step 1 (4 // 3)
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    assert row["tokens_per_s"] == pytest.approx(tokens / seconds)
    assert row["final_loss"] == steps[-1]["loss"] and row["peak_mem_gib"] is None  # no GPU


def test_the_timed_window_is_the_last_two_thirds():
    points = [(10.0 * i, 1000 * i) for i in range(1, 10)]  # 9 steps, 1000 tokens / 10 s each
    points[0] = (60.0, 1000)  # a slow first step (compilation) is outside the window
    assert bench.timed_rate(points) == pytest.approx(6000 / 60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_the_bench_case_on_a_cpu_fails_with_run_py_s_one_line(tmp_path):
    result = check.run_bench(check.BENCH, 120, tmp_path)
    assert result.status == "failed"
    assert result.error.startswith("run.py wrote no report: exit 2")
    assert "needs a CUDA GPU; none is visible" in result.error
    assert result.log[0].startswith("$ " + sys.executable + " " + str(GPU / "run.py"))
    r = subprocess.run([sys.executable, str(GPU / "run.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--steps 2" in r.stderr.splitlines()[-1]


def python_with_trl() -> str | None:
    """A Python that imports trl: the TRL venv bench/vs_peers makes (`python3
    bench/vs_peers/run.py --setup-only`), or this one where trl is installed; None: neither."""
    venv = ROOT / "bench" / ".venvs" / "trl" / "bin" / "python"
    if venv.is_file():
        return str(venv)
    return sys.executable if importlib.util.find_spec("trl") else None


@pytest.mark.skipif(
    python_with_trl() is None,
    reason="TRL is a peer's tool, not a lockstep dependency: `python3 bench/vs_peers/run.py "
    "--setup-only` makes its venv (bench/.venvs/trl), which this test then uses",
)
def test_trl_script_trains_and_counts_the_tokens_trl_counts(tmp_path):
    """trl_gpu.py on this CPU (eager), in a Python with trl: its report has TRL's numbers."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "src/lockstep/model/builtin/tiny")
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=len(tok),
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "trl.json"
    r = subprocess.run([python_with_trl(), str(GPU / "trl_gpu.py"), str(tmp_path / "model"),
                        str(DEMO_DATA), str(out), "--steps=3", "--seq=256", "--micro=2",
                        "--accumulation=2", "--no-compile"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["steps"] == 3 and got["tokens_per_s"] > 0 and got["attn_implementation"] == "sdpa"
    assert got["tokens"] == got["trl_num_tokens"] > 0
