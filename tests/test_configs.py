"""`lockstep configs` lists and copies the examples shipped in the package; they, their copies
and `lockstep train NAME` run from any folder (their data is `builtin:`); every example trains."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES, run_cli

from lockstep import config
from lockstep.data import sources
from lockstep.report.metrics import read

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))


def test_list_and_copy(tmp_path):
    res = run_cli("configs")
    assert res.returncode == 0
    listed = [line.split()[0] for line in res.stdout.splitlines()[: len(NAMES)]]
    assert listed == NAMES and {"demo", "lora", "freeze", "multi_gpu", "packing"} <= set(NAMES)
    assert "builtin:demo_train.jsonl" in res.stdout and str(EXAMPLES / "data") in res.stdout
    res = run_cli("configs", "copy", "lora", str(tmp_path))
    assert res.returncode == 0 and f"lockstep train {tmp_path / 'lora.yaml'}" in res.stdout
    assert (tmp_path / "lora.yaml").read_text() == (EXAMPLES / "lora.yaml").read_text()
    again = run_cli("configs", "copy", "lora", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr
    missing = run_cli("configs", "copy", "nope")
    assert missing.returncode == 1 and "available: demo" in missing.stderr


def test_examples_read_only_shipped_data():
    """No example names a file relative to the repository: each data path is builtin:."""
    for name in NAMES:
        cfg = config.load(EXAMPLES / f"{name}.yaml")
        paths = [ds.path for ds in cfg.data.train + cfg.data.eval]
        assert paths and all(p.startswith("builtin:") for p in paths), (name, paths)


def test_copied_config_and_name_run_from_an_empty_folder(tmp_path):
    """A copy of the demo, and the demo by name, find their data from a folder holding nothing
    else: the config loads, its data files are checked and the plan is made (--dry-run)."""
    work = tmp_path / "empty"
    work.mkdir()
    res = run_cli("configs", "copy", "demo", "x.yaml", cwd=work)
    assert res.returncode == 0, res.stderr
    res = run_cli("train", "x.yaml", "--dry-run", cwd=work)
    assert res.returncode == 0, res.stderr
    assert "world: 1 process" in res.stdout and "x.yaml" in res.stdout
    res = run_cli("train", "demo", "--dry-run", cwd=work)
    assert res.returncode == 0, res.stderr
    assert str(EXAMPLES / "demo.yaml") in res.stdout  # the shipped file is what runs
    assert sorted(p.name for p in work.iterdir()) == ["x.yaml"]  # nothing written beside it


def test_builtin_data_reads_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = EXAMPLES / "data" / "demo_train.jsonl"
    assert sources.local("builtin:demo_train.jsonl") == str(shipped)
    assert sources.local("data/demo_train.jsonl") == "data/demo_train.jsonl"  # others as given
    records = list(sources.read("builtin:demo_train.jsonl"))
    assert len(records) == 2000 and records[0].where.startswith(str(shipped))
    assert sources.content_hash("builtin:demo_train.jsonl") == sources.content_hash(str(shipped))


def test_unknown_names_are_one_line_errors(tmp_path):
    res = run_cli("train", "demoo", "--dry-run", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "config file 'demoo' not found" in res.stderr and "examples: demo," in res.stderr
    res = run_cli("train", "demo", "data.train.0.path=builtin:nope.jsonl", "--dry-run")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert (
        "data.train.0.path: no data file 'builtin:nope.jsonl' ships with lockstep; shipped: "
        "builtin:demo_eval.jsonl, builtin:demo_pairs.jsonl, builtin:demo_pairs_eval.jsonl, "
        "builtin:demo_train.jsonl" in res.stderr
    )
    res = run_cli("train", "demo.yaml", "--dry-run", cwd=tmp_path)  # a path: the loader's error
    assert res.returncode == 1 and "config file 'demo.yaml' not found" in res.stderr


# examples that start from another example's output start from the built-in model here
STARTS = {"dpo": ["model.path=builtin:tiny"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_example_validates_and_trains_two_steps(tmp_path, name):
    path = EXAMPLES / f"{name}.yaml"
    config.load(path)  # validates
    out = tmp_path / "out"
    res = run_cli("train", name, f"output_dir={out}", "train.max_steps=2",
                  f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=null",
                  *STARTS.get(name, []), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read(out / "metrics.jsonl") if "loss" in r] == [2]
    assert (out / "final").is_dir()
