"""log.trackers: W&B (offline) and MLflow (file store) runs, read back: every metrics.jsonl row
at its step, the config as parameters, and a resumed run continuing the same tracker run."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from conftest import run_cli, small_config

from lockstep.config import LogConfig
from lockstep.report.metrics import read
from lockstep.trackers import chosen, flat

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": None,
           "MLFLOW_ALLOW_FILE_STORE": None}  # fmt: skip
WANDB_BLOCK, WANDB_HEADER = 32768, 7  # the .wandb file: a LevelDB-style log of protobuf records


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file: 32 KiB blocks of chunks, each with
    a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last), after the
    file's own 7-byte header (:W&B, magic, version)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + WANDB_HEADER : pos + WANDB_HEADER + length]
        pos += WANDB_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(out: Path, run_id: str) -> tuple[list[dict], dict, set[str]]:
    """(history rows in the order logged, the run's config, the run ids) of every offline run
    folder of `run_id` under OUT/wandb (a resumed offline run writes a folder of its own)."""
    rows, config, ids = [], {}, set()
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in record.history.item})  # fmt: skip
    return sorted(rows, key=lambda r: r["_timestamp"]), config, ids


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture
def tracked(tmp_path, alpaca_file):
    """A run that fails at step 3 (after step 2's checkpoint), then resumes and finishes."""
    cfg = small_config(
        tmp_path, alpaca_file, train={"max_steps": 4}, checkpoint={"every_steps": 2},
        data={"val_fraction": 0.25}, eval={"every_steps": 2},
        log={"every_steps": 1, "trackers": ["wandb", "mlflow"], "project": "tiny"},
    )  # fmt: skip
    first = run_cli("train", str(cfg), "testing.fail_at_step=3", env=OFFLINE)
    assert first.returncode == 1 and "injected failure at step 3" in first.stderr
    second = run_cli("train", str(cfg), env=OFFLINE)
    assert second.returncode == 0 and "at step 2" in second.stderr, second.stderr
    return tmp_path / "out", first, second


def test_trackers_hold_metrics_and_a_resume_continues_their_runs(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, first, second = tracked
    rows = read(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    ids = state["trackers"]
    assert "(new, offline)" in first.stderr and "(continued, offline)" in second.stderr
    assert f"mlflow run {ids['mlflow']} (continued)" in second.stderr

    history, config, run_ids = wandb_run(out, ids["wandb"])
    assert run_ids == {ids["wandb"]}  # both folders: the same W&B run
    assert len(list((out / "wandb").glob(f"offline-run-*-{ids['wandb']}*"))) == 2
    for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_ppl"):
        assert series(history, key) == series(rows, key), key
    assert config["seed"] == 7 and config["config_hash"] == state["config_hash"]  # the latest
    assert config["optim"]["lr"] == 1e-3

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # the resume continued it
    for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_ppl"):
        logged = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
        assert sorted(logged) == series(rows, key), key
    params = runs[0].data.params  # those of its start (MLflow's parameters never change)
    started = re.search(r"config_hash: (\w+)", first.stderr)[1]  # with testing.fail_at_step
    assert params["seed"] == "7" and params["config_hash"] == started != state["config_hash"]
    assert params["optim.lr"] == "0.001" and params["log.trackers"] == "['wandb', 'mlflow']"
    assert runs[0].info.status == "FINISHED"


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path):
    """A folder first on the path whose `wandb` fails to import, as an uninstalled one does."""
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    cfg = small_config(tmp_path, log={"trackers": ["wandb"]})
    src = Path(__file__).resolve().parents[1] / "src"
    res = run_cli("train", str(cfg), env={"PYTHONPATH": f"{shadow.parent}:{src}"})
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "lockstep: error: log.trackers: wandb needs the wandb package (No module named "
        "'wandb'): pip install 'lockstep-finetune[wandb]' (or pip install wandb)"
    )
    assert not (tmp_path / "out").exists()


def test_tracker_names_and_parameters():
    assert chosen(LogConfig(trackers=["mlflow", "tensorboard"], tensorboard=True)) == [
        "mlflow", "tensorboard",
    ]  # fmt: skip
    assert chosen(LogConfig(tensorboard=True)) == ["tensorboard"]
    assert flat({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": 1, "a.c": [1, 2], "d": None, "e": {},
    }  # fmt: skip


@pytest.mark.slow
def test_only_rank_0_logs(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file, log={"every_steps": 1,
                                                   "trackers": ["wandb", "mlflow"]})  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc-per-node", "2", env=OFFLINE)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert len(list((out / "mlruns").glob("*/*/meta.yaml"))) == 1  # one run in one experiment
    rows = read(out / "metrics.jsonl")
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    history, _, _ = wandb_run(out, state["trackers"]["wandb"])
    assert series(history, "loss") == series(rows, "loss") and len(rows) == 3


class Recorder:
    """A tracker that keeps what it is given; `fail_at`: the step whose log raises."""

    name, run_id, where = "recorder", "r1", "here"

    def __init__(self, fail_at: int | None = None) -> None:
        self.logged, self.closed, self.fail_at = [], None, fail_at

    def log(self, step, values):
        if step == self.fail_at:
            raise OSError("No space left on device")
        self.logged.append((step, dict(values)))

    def close(self, status):
        self.closed = status


def test_the_writer_fans_every_row_out_and_drops_a_failing_tracker(tmp_path):
    import logging

    from lockstep.report.metrics import MetricsWriter

    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("lockstep").addHandler(handler)

    good, bad = Recorder(), Recorder(fail_at=2)
    bad.name = "flaky"
    writer = MetricsWriter(tmp_path / "metrics.jsonl", trackers=[good, bad])
    rows = [{"step": 1, "loss": 2.5, "batch_sha": "ab12", "tokens": 40, "replay": "0/2"},
            {"step": 2, "eval_loss": 2.25, "eval_tokens": 12, "ok": True},
            {"step": 3, "loss": 2.0}]  # fmt: skip
    for row in rows:
        writer.write(row)
    assert writer.run_ids() == {"recorder": "r1"}
    writer.close("stopped")
    logging.getLogger("lockstep").removeHandler(handler)
    assert read(tmp_path / "metrics.jsonl") == rows
    assert good.logged == [(1, {"loss": 2.5, "tokens": 40}), (2, {"eval_loss": 2.25,
                           "eval_tokens": 12}), (3, {"loss": 2.0})]  # fmt: skip
    assert bad.logged == [(1, {"loss": 2.5, "tokens": 40})] and bad.closed is None
    assert good.closed == "stopped"
    assert warned == [
        "log.trackers: flaky failed to log (No space left on device); training goes on without "
        "it (metrics.jsonl has every row)"
    ]
