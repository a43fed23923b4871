"""`lockstep configs` lists and copies; every shipped example config validates and trains."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_cli

from lockstep import config
from lockstep.report.metrics import read

NAMES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))


def test_list_and_copy(tmp_path):
    res = run_cli("configs")
    assert res.returncode == 0
    listed = [line.split()[0] for line in res.stdout.splitlines()[: len(NAMES)]]
    assert listed == NAMES and {"demo", "lora", "freeze", "multi_gpu", "packing"} <= set(NAMES)
    res = run_cli("configs", "copy", "lora", str(tmp_path))
    assert (
        res.returncode == 0
        and (tmp_path / "lora.yaml").read_text() == (ROOT / "examples" / "lora.yaml").read_text()
    )
    again = run_cli("configs", "copy", "lora", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr
    missing = run_cli("configs", "copy", "nope")
    assert missing.returncode == 1 and "available: demo" in missing.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_example_validates_and_trains_two_steps(tmp_path, name):
    path = ROOT / "examples" / f"{name}.yaml"
    config.load(path)  # validates
    out = tmp_path / "out"
    res = run_cli("train", str(path), f"output_dir={out}", "train.max_steps=2",
                  f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=null")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read(out / "metrics.jsonl") if "loss" in r] == [2]
    assert (out / "final").is_dir()
