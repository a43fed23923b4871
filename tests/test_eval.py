"""Evaluation during training equals the standalone `lockstep eval` of the same checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA, ROOT, run_cli, small_config

from lockstep.report.metrics import read

EVAL_DATA = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_eval.jsonl"


@pytest.mark.parametrize(
    ("held_out", "dtype"),
    [("eval_file", "float32"), ("val_fraction", "float32"), ("eval_file", "bfloat16")],
)
def test_eval_loss_in_metrics_equals_lockstep_eval(tmp_path, held_out, dtype):
    """Also in the run's precision: bf16 mixed evaluates under bf16 autocast, as training did."""
    data = ({"eval": [{"path": str(EVAL_DATA)}]} if held_out == "eval_file"
            else {"val_fraction": 0.05})  # fmt: skip
    cfg = small_config(tmp_path, data={**data, "padding_free": False}, model={"dtype": dtype},
                       train={"max_steps": 6}, eval={"every_steps": 3},
                       checkpoint={"every_steps": 3})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    evals = [r for r in read(tmp_path / "out" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[0]["eval_ppl"] == pytest.approx(2.718281828 ** evals[0]["eval_loss"], rel=1e-6)
    for row in evals:
        ckpt = tmp_path / "out" / "checkpoints" / f"step-{row['step']:08d}"
        res = run_cli("eval", str(cfg), "--checkpoint", str(ckpt))
        assert res.returncode == 0, res.stderr
        standalone = json.loads(res.stdout.strip().splitlines()[-1])
        assert standalone["eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-5, abs=1e-5)
        assert standalone["eval_tokens"] == row["eval_tokens"]


@pytest.mark.slow
def test_eval_in_two_processes_equals_one(tmp_path):
    results = {}
    for procs in ("1", "2"):
        folder = tmp_path / procs
        folder.mkdir()
        cfg = small_config(folder, data={"val_fraction": 0.05}, train={"max_steps": 2},
                           eval={"every_steps": 2})  # fmt: skip
        res = run_cli("train", str(cfg), "--nproc-per-node", procs)
        assert res.returncode == 0, res.stderr
        results[procs] = [r for r in read(folder / "out" / "metrics.jsonl") if "eval_loss" in r]
    assert results["1"][0]["eval_loss"] == pytest.approx(results["2"][0]["eval_loss"], rel=1e-4)
    assert results["1"][0]["eval_tokens"] == results["2"][0]["eval_tokens"]


def test_eval_without_eval_data_is_a_config_error(tmp_path):
    res = run_cli("train", str(small_config(tmp_path, eval={"every_steps": 2})))
    assert (
        res.returncode == 1 and "set data.eval" in res.stderr and "data.val_fraction" in res.stderr
    )


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(tmp_path, data={"val_fraction": 0.05}, train={"max_steps": 3},
                       eval={"every_steps": 3}, log={"every_steps": 1, "tensorboard": True})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    expected = [r["loss"] for r in read(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]


def test_a_missing_eval_file_is_named_as_data_eval(tmp_path):
    missing = tmp_path / "nope.jsonl"
    cfg = small_config(tmp_path, data={"eval": [{"path": str(DEMO_DATA)}, {"path": str(missing)}]})
    res = run_cli("train", str(cfg))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"data.eval.1.path: file {str(missing)!r} not found" in res.stderr
    assert "data.train" not in res.stderr
    res = run_cli("eval", str(cfg), "--checkpoint", str(tmp_path / "out"))
    assert res.returncode == 1 and "data.eval.1.path" in res.stderr, res.stderr
