"""The run folder: one run per output_dir (a lock a killed run cannot leave behind), what start-up
may delete, checkpoints complete only with every rank's files, nothing loaded runs code."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import HANG_S, ROOT, run_cli, small_config
from test_checkpoint import start, wait_for_step

from lockstep import config as config_mod
from lockstep.errors import CheckpointError
from lockstep.training import checkpoint, rundir, sharded

HOLD = """
import sys, time
from pathlib import Path
from lockstep.training import rundir
rundir.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------- the output_dir lock


def test_a_held_output_dir_is_refused_naming_the_holder_and_freed_by_kill_9(tmp_path):
    out = tmp_path / "out"
    owner = _holder(out)
    try:
        with pytest.raises(CheckpointError) as refused:
            rundir.acquire(out)
        line = str(refused.value)
        assert "\n" not in line and str(out) in line and "in use by another lockstep run" in line
        assert f"pid {owner.pid} on {socket.gethostname()}" in line
        assert "another output_dir" in line
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert (out / rundir.LOCK_FILE).is_file()  # the stale file is left behind...
    fd = rundir.acquire(out)  # ...and does not block
    try:
        info = json.loads((out / rundir.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_on_every_rank(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 400})
    first = start(cfg)
    try:
        wait_for_step(tmp_path / "out", 2, first)
        t0 = time.monotonic()
        res = run_cli("train", str(cfg), "train.max_steps=2")
        assert res.returncode == 1 and time.monotonic() - t0 < 300  # refused, not waiting
        assert f"is in use by another lockstep run (pid {first.pid} on" in res.stderr
        assert "Traceback" not in res.stderr
        res = run_cli("train", str(cfg), "train.max_steps=2", "--nproc-per-node", "2")
        assert res.returncode == 1, res.stderr
        cause = res.stderr.strip().splitlines()[-2]
        assert cause.startswith("lockstep: error: training failed") and "is in use" in cause
        log = max((tmp_path / "out" / "logs").glob("launch-*.log")).read_text()
        for rank in (0, 1):  # every rank stopped, in words (in the launch log)
            assert f"lockstep: error: rank {rank}: output_dir {tmp_path / 'out'} is in use" in log
        assert first.poll() is None  # the first run trains on, undisturbed
        assert not (tmp_path / "out" / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=HANG_S)
    assert first.returncode == 128 + signal.SIGTERM
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, none interleaved


# ---------------------------------------------------------------- start-up cleaning


def test_start_up_removes_only_lockstep_leftovers(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000005", "step-00000010", ".tmp-step-00000011", "other-tool", "step-x"):
        (root / name).mkdir(parents=True)
    (root / "step-00000005" / checkpoint.COMPLETE).write_text("ok\n")
    (root / "notes.txt").write_text("mine")
    removed = checkpoint.clean_incomplete(root)
    assert sorted(p.name for p in removed) == [".tmp-step-00000011", "step-00000010"]
    assert sorted(p.name for p in root.iterdir()) == [
        "notes.txt", "other-tool", "step-00000005", "step-x",
    ]  # fmt: skip


# ---------------------------------------------------------------- resume onto the right device


def _claim_cuda(path: Path) -> None:
    """Rewrite a torch.save'd file so that its tensors say they were saved from cuda:0, as an
    optimizer.pt written by a GPU run does (this machine has no GPU to write one)."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            if name.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(name, data)


class _Engine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(3, 2)


def test_resume_reads_optimizer_state_saved_on_a_gpu_onto_this_ranks_device(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    engine = _Engine()
    optimizer = torch.optim.AdamW(engine.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine.model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    save_file(checkpoint.trainable_state(engine.model), ckpt / "model.safetensors")
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    _claim_cuda(ckpt / "optimizer.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does
        torch.load(ckpt / "optimizer.pt", weights_only=True)

    fresh = _Engine()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    loaded = checkpoint.Loaded(ckpt, {"step": 1}, {})
    assert checkpoint.load_into(loaded, fresh.model, opt2, sched2, rank=0) is False
    for p, q in zip(engine.parameters(), fresh.parameters(), strict=True):
        a, b = optimizer.state[p], opt2.state[q]
        assert b["exp_avg"].device == q.device and torch.equal(a["exp_avg"], b["exp_avg"])


# ---------------------------------------------------------------- every rank's files


def _saver_inputs(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = config_mod.validate({"data": {"train": [{"path": "x.jsonl"}]}, "seed": 1})
    return model, optimizer, scheduler, {"step": 4}, cfg


def test_a_checkpoint_without_every_ranks_files_is_never_complete(tmp_path):
    root = tmp_path / "checkpoints"
    saver = checkpoint.Saver(root, None, rank=0, world=2)
    saver.write_rank_files(4)  # rank 1 wrote its file on another node's disk
    with pytest.raises(CheckpointError) as err:
        saver.write_shared(4, *_saver_inputs(tmp_path))
    line = str(err.value)
    assert "rng-rank-1.pt" in line and "storage shared by all nodes" in line and "\n" not in line
    assert not (root / "step-00000004").exists() and not saver.tmp_dir(4).exists()
    assert checkpoint.complete_checkpoints(root) == []

    saver = checkpoint.Saver(root, None, rank=1, world=2)
    saver.write_rank_files(4)
    saver.rank = 0
    saver.write_rank_files(4)
    final = saver.write_shared(4, *_saver_inputs(tmp_path))
    assert checkpoint.complete_checkpoints(root) == [final]


def _dcp_save(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))


def test_a_sharded_checkpoint_missing_a_shard_file_is_never_complete(tmp_path):
    root = tmp_path / "checkpoints"
    saver = checkpoint.Saver(root, None, rank=0, world=1)
    saver.write_rank_files(4)
    _dcp_save(saver.tmp_dir(4) / "sharded")
    shards = list((saver.tmp_dir(4) / "sharded").glob("*.distcp"))
    assert shards and sharded.missing_files(saver.tmp_dir(4)) == []
    shards[0].unlink()  # written by a rank on another node
    with pytest.raises(CheckpointError, match=f"sharded/{shards[0].name}.*storage shared"):
        saver.write_shared(4, *_saver_inputs(tmp_path))
    assert checkpoint.complete_checkpoints(root) == []


# ---------------------------------------------------------------- nothing loaded runs code


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fake_checkpoint(tmp_path: Path, **model) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    cfg = config_mod.validate(
        {
            "data": {"train": [{"path": "x.jsonl"}]},
            "seed": 1,
            "model": {"path": "builtin:tiny", **model},
        }
    )
    config_mod.dump(cfg, ckpt / "config.yaml")
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))
    (ckpt / checkpoint.COMPLETE).write_text("ok\n")
    return ckpt


def test_dcp_metadata_that_would_run_code_is_refused_before_dcp_reads_it(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    _dcp_save(ckpt / "sharded")
    sharded.check_metadata(ckpt)  # real DCP metadata passes
    marker = tmp_path / "ran"
    (ckpt / "sharded" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "hf"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "refusing sharded checkpoint" in res.stderr and "posix.system" in res.stderr
    assert not marker.exists()


REMOTE_CONFIG = {"model_type": "llama", "auto_map": {"AutoConfig": "remote.Conf"}}
REMOTE_CODE = "from pathlib import Path\nPath({marker!r}).touch()\n"  # transformers copies it


@pytest.mark.parametrize("command", ["export", "eval"])
def test_a_checkpoint_never_turns_remote_code_on_by_itself(tmp_path, command):
    model_dir = tmp_path / "remote-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(REMOTE_CONFIG))
    marker = tmp_path / "ran"
    (model_dir / "remote.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    ckpt = _fake_checkpoint(tmp_path, path=str(model_dir), trust_remote_code=True)
    if command == "export":
        res = run_cli("export", str(ckpt), "--out", str(tmp_path / "hf"))
    else:
        cfg = small_config(tmp_path, data={"val_fraction": 0.1})
        res = run_cli("eval", str(cfg), "--checkpoint", str(ckpt))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "model.trust_remote_code=true" in res.stderr and "--trust-remote-code" in res.stderr
    assert not marker.exists()
    from lockstep.export import checkpoint_config

    assert checkpoint_config(ckpt, trust_remote_code=True).model.trust_remote_code


# ---------------------------------------------------------------- the data cache


def _damage(path: Path, how: str) -> None:
    import numpy as np

    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00not a cache entry" * 50)
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if how == "wrong arrays":
            arrays["labels"] = arrays["labels"][:-3]
        else:  # bad stats
            arrays["stats"] = np.array("{not json")
        with path.open("wb") as f:
            np.savez(f, **arrays)


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong arrays", "bad stats"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, alpaca_file, how):
    from lockstep.data import cache
    from lockstep.model.load import load_tokenizer

    cfg = config_mod.load(small_config(tmp_path, alpaca_file), [])
    tokenizer = load_tokenizer(cfg.model)
    fresh, made = cache.load_or_build(cfg.data, tokenizer)
    entry = next((tmp_path / "cache").glob("samples-*.npz"))
    assert "cached in" in made
    _damage(entry, how)
    rebuilt, said = cache.load_or_build(cfg.data, tokenizer)
    assert f"the cache entry {entry} is damaged (" in said and "cached in" in said
    assert [x.tolist() for x in rebuilt.input_ids] == [x.tolist() for x in fresh.input_ids]
    assert [x.tolist() for x in rebuilt.labels] == [x.tolist() for x in fresh.labels]
    again, said = cache.load_or_build(cfg.data, tokenizer)  # rewritten whole
    assert said.startswith("reusing") and again.stats == fresh.stats
