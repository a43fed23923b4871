"""log.profile: the chosen steps are profiled by phase, on the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, small_config

from lockstep import config
from lockstep.errors import ConfigError
from lockstep.training.profile import PHASES, out_of_reach


def test_profile_writes_the_phases_of_the_chosen_steps(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 4}, log={"every_steps": 1, "profile": [2, 3]})
    r = run_cli("train", str(cfg))
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "out" / "profile"
    summary = json.loads((folder / "rank0.json").read_text())
    assert summary["steps"] == [2, 3]
    seconds = summary["seconds"]
    assert set(seconds) == {*PHASES, "other"}
    assert all(seconds[p] > 0 for p in PHASES)
    # the phases never overlap: with what no phase holds, they add up to the profiled time
    assert sum(seconds.values()) == pytest.approx(summary["wall_s"], rel=1e-3)
    assert sum(summary["share"].values()) == pytest.approx(1.0, abs=1e-3)
    # the model's matrix products are among the heaviest operators (autograd's and the
    # optimizer's own ranges may be too)
    assert "aten::mm" in [op["op"] for op in summary["top_ops"][:3]]
    assert all(op["self_s"] >= 0 and op["calls"] > 0 for op in summary["top_ops"])

    events = json.loads((folder / "rank0.trace.json").read_text())["traceEvents"]
    ranges = [e["name"] for e in events if e.get("name", "").startswith("lockstep.")]
    # 2 steps x 2 micro-batches (global 8, micro 4): forward and backward per micro-batch; data
    # once per step (its counts) and per micro-batch; step and after once per step
    assert {name: ranges.count(name) for name in set(ranges)} == {
        "lockstep.data": 6, "lockstep.forward": 4, "lockstep.backward": 4,
        "lockstep.step": 2, "lockstep.after": 2,
    }  # fmt: skip
    assert "aten::" in (folder / "rank0.ops.txt").read_text()
    assert "profile of steps 2-3 (rank0" in r.stderr + r.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]  # the run itself goes on as without a profile


def test_profile_steps_in_the_wrong_order_are_refused_with_the_fix(tmp_path):
    raw = {"data": {"train": [{"path": "x.jsonl"}]}, "log": {"profile": [4, 2]}}
    with pytest.raises(ConfigError, match=r"log.profile=\[4, 2\].*write \[2, 4\]"):
        config.validate(raw)


def test_profile_steps_the_run_never_reaches_are_named_with_what_to_write():
    assert out_of_reach(None, 0, 10) is None
    assert out_of_reach((3, 4), 0, 10) is None
    assert out_of_reach((3, 6), 4, 10) is None  # a resume inside the range: steps 5-6 profiled
    past = out_of_reach((3, 4), 6, 20)
    assert "resumes after step 6" in past and "log.profile=[8, 9]" in past
    assert "ends at step 10" in out_of_reach((12, 14), 0, 10)
