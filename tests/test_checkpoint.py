"""Checkpoints never lose a run: exact resume after SIGKILL, across world sizes, on SIGTERM."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import HANG_S, ROOT, run_cli, small_config
from safetensors.torch import load_file

from lockstep import config
from lockstep.report.metrics import read


def start(cfg, *args: str, preexec=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lockstep", "train", str(cfg), *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
    )  # fmt: skip


def wait_for_step(
    out, step: int, proc: subprocess.Popen, timeout: float = HANG_S, name: str = "metrics.jsonl"
) -> None:
    deadline = time.monotonic() + timeout
    path = out / name
    while time.monotonic() < deadline:
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def test_exact_resume_after_sigkill(tmp_path):
    steps = {"train": {"max_steps": 30}, "checkpoint": {"every_steps": 15}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_cfg = small_config(tmp_path / "a", **steps)
    assert run_cli("train", str(ref_cfg)).returncode == 0
    reference = read(tmp_path / "a" / "out" / "metrics.jsonl")

    cfg = small_config(tmp_path / "b", **steps)
    kill_at = random.randint(16, 24)
    proc = start(cfg)
    wait_for_step(tmp_path / "b" / "out", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "step-00000015" in res.stderr
    resumed = read(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 31))
    for key in ("loss", "batch_sha", "grad_norm", "lr"):
        assert [r[key] for r in resumed[15:]] == [r[key] for r in reference[15:]], key
    a = load_file(tmp_path / "a" / "out" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_two_process_checkpoint_resumes_with_one(tmp_path):
    sections = {"train": {"max_steps": 16}, "checkpoint": {"every_steps": 8}}
    cfg = small_config(tmp_path, **sections)
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr
    two = read(tmp_path / "out" / "metrics.jsonl")
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000008"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    one_out = tmp_path / "one"
    res = run_cli("train", str(cfg), f"output_dir={one_out}", f"checkpoint.resume={ckpt}")
    assert res.returncode == 0, res.stderr
    one = read(one_out / "metrics.jsonl")
    assert [r["step"] for r in one] == list(range(9, 17))
    assert [r["batch_sha"] for r in one] == [r["batch_sha"] for r in two[8:]]
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two[8:]], rel=1e-4)


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 10}, checkpoint={"every_steps": 5})
    assert run_cli("train", str(cfg)).returncode == 0
    root = tmp_path / "out" / "checkpoints"
    (root / "step-00000010" / "COMPLETE").unlink()  # as if killed while saving
    (root / ".tmp-step-00000011").mkdir()
    (root / "other-tool").mkdir()  # not lockstep's: left alone
    res = run_cli("train", str(cfg), "train.max_steps=12")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "step-00000005 at step 5" in res.stderr
    assert f"removed an incomplete checkpoint (an interrupted save): {root}" in res.stderr
    assert "other-tool" not in res.stderr
    assert sorted(p.name for p in root.iterdir()) == ["other-tool", "step-00000005",
                                                      "step-00000010", "step-00000012"]  # fmt: skip
    assert [r["step"] for r in read(tmp_path / "out" / "metrics.jsonl")] == list(range(1, 13))


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 5}, checkpoint={"every_steps": 5})
    assert run_cli("train", str(cfg)).returncode == 0
    proc = start(cfg, "train.max_steps=10", preexec=_limit_file_size)  # "disk full" at 1 MiB
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 1
    assert "lockstep: error: cannot write checkpoint" in err and "step-00000010" in err
    assert "the previous checkpoint is untouched" in err and "Traceback" not in err
    assert "enforce fail" not in err and "unexpected pos" not in err
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]
    res = run_cli("train", str(cfg), "train.max_steps=6")
    assert res.returncode == 0 and "step-00000005 at step 5" in res.stderr


def test_sigterm_saves_and_the_run_continues(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 400})
    proc = start(cfg)
    wait_for_step(tmp_path / "out", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step" in err and "Run the same command again" in err
    saved = [p for p in (tmp_path / "out" / "checkpoints").iterdir()]
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    at = json.loads((saved[0] / "state.json").read_text())["step"]
    res = run_cli("train", str(cfg), "train.max_steps=" + str(at + 2))
    assert res.returncode == 0, res.stderr
    assert f"at step {at}" in res.stderr
    assert read(tmp_path / "out" / "metrics.jsonl")[-1]["step"] == at + 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "field"),
    [("seed=8", "seed: 7 -> 8"), ("data.max_length=32", "data.max_length: 64 -> 32")],
)
def test_resume_refuses_a_changed_data_order_unless_forced(tmp_path, change, field):
    cfg = small_config(tmp_path, train={"max_steps": 2})
    assert run_cli("train", str(cfg)).returncode == 0
    res = run_cli("train", str(cfg), change, "train.max_steps=3")
    assert res.returncode == 1 and field in res.stderr and "resume_force" in res.stderr
    res = run_cli("train", str(cfg), change, "train.max_steps=3", "checkpoint.resume_force=true")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved == config.to_dict(config.load(cfg, [change, "train.max_steps=3",
                                                        "checkpoint.resume_force=true"]))  # fmt: skip
    # harmless fields may change freely
    res = run_cli("train", str(cfg), change, "train.max_steps=4", "log.every_steps=2",
                  "checkpoint.every_steps=3")  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_resume_never_refuses_existing_checkpoints_unless_overwrite(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 2})
    assert run_cli("train", str(cfg)).returncode == 0
    res = run_cli("train", str(cfg), "checkpoint.resume=never")
    assert res.returncode == 1 and "checkpoint.overwrite=true" in res.stderr
    res = run_cli("train", str(cfg), "checkpoint.resume=never", "checkpoint.overwrite=true")
    assert res.returncode == 0 and "resuming" not in res.stderr


@pytest.mark.slow  # the default suite's 10 minutes; CI runs it
def test_resume_cost_does_not_depend_on_the_step(tmp_path):
    """Resume at step 1,000,000 reads only the samples of the steps it trains."""
    cfg = small_config(tmp_path, train={"max_steps": 2}, log={"sample_ids": True})
    assert run_cli("train", str(cfg)).returncode == 0
    root = tmp_path / "out" / "checkpoints"
    far = root / "step-01000000"
    shutil.copytree(root / "step-00000002", far)
    state = json.loads((far / "state.json").read_text())
    state["step"] = 1_000_000
    (far / "state.json").write_text(json.dumps(state))
    res = run_cli("train", str(cfg), "train.max_steps=1000002")
    assert res.returncode == 0, res.stderr
    assert "at step 1000000" in res.stderr
    lines = (tmp_path / "out" / "sample_ids" / "rank-0-of-1.jsonl").read_text().splitlines()
    steps_read = [json.loads(x)["step"] for x in lines]
    # 2 steps before the copy, then only steps 1,000,001 and 1,000,002 (2 micro-batches each)
    assert steps_read == [1, 1, 2, 2, 1_000_001, 1_000_001, 1_000_002, 1_000_002]


def test_export_a_checkpoint_to_a_hugging_face_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = small_config(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert run_cli("train", str(cfg)).returncode == 0
    res = run_cli("export", str(tmp_path / "out"), "--out", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, final(ids).logits)
    step2 = tmp_path / "out" / "checkpoints" / "step-00000002"
    res = run_cli("export", str(step2), "--out", str(tmp_path / "hf2"), "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert next(m2.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert not torch.allclose(m2(ids).logits.float(), final(ids).logits, atol=1e-3)
    res = run_cli("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert res.returncode == 1 and "nothing does not exist" in res.stderr


def test_sigterm_during_a_replay_stops_without_saving(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 400})
    proc = start(cfg, "--debug", "--as-rank", "1/2")
    wait_for_step(tmp_path / "out", 2, proc, name="metrics-replay-rank1-of-2.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "(a replay saves nothing)" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_guard_reads_settings_an_older_config_lacks_as_defaults():
    from pathlib import Path

    from lockstep import config as config_mod
    from lockstep.errors import CheckpointError
    from lockstep.training.checkpoint import Loaded, check_config_change

    cfg = config_mod.validate({"data": {"train": [{"path": "x.jsonl"}]}, "seed": 1})
    older = config_mod.to_dict(cfg)
    for key in ("multi_turn", "reasoning", "chat_template", "template_kwargs"):
        del older["data"][key]  # written before these settings existed
    check_config_change(Loaded(Path("ck"), {}, older), cfg)  # nothing changed
    changed = config_mod.to_dict(cfg)
    changed["data"]["multi_turn"] = "whole"  # how records become samples: the data order
    with pytest.raises(CheckpointError, match=r"data.multi_turn: 'whole' -> 'auto'"):
        check_config_change(Loaded(Path("ck"), {}, changed), cfg)


def test_resume_refuses_an_edited_chat_template_file_unless_forced(tmp_path):
    from lockstep.model.load import BUILTIN_DIR

    template = tmp_path / "chat.jinja"
    template.write_text((BUILTIN_DIR / "tiny" / "chat_template.jinja").read_text())
    cfg = small_config(tmp_path, train={"max_steps": 1})
    args = ("train", str(cfg), f"data.chat_template={template}")
    assert run_cli(*args).returncode == 0
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    res = run_cli(*args, "train.max_steps=2")
    assert res.returncode == 1
    assert "the tokenised data is not what it trained on (data fingerprint" in res.stderr
    assert run_cli(*args, "train.max_steps=2", "checkpoint.resume_force=true").returncode == 0


def test_first_logged_loss_after_a_resume_equals_the_uninterrupted_run(tmp_path):
    """A checkpoint between two logged steps keeps the losses since the last logged one."""
    sections = {"train": {"max_steps": 8}, "checkpoint": {"every_steps": 3},
                "log": {"every_steps": 4}}  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_cli("train", str(small_config(tmp_path / "a", **sections))).returncode == 0
    reference = read(tmp_path / "a" / "out" / "metrics.jsonl")
    cfg = small_config(tmp_path / "b", **sections)
    res = run_cli("train", str(cfg), "testing.fail_at_step=5")  # after step-3 and the row of 4
    assert res.returncode == 1 and "injected failure at step 5" in res.stderr
    res = run_cli("train", str(cfg))
    assert res.returncode == 0 and "at step 3" in res.stderr, res.stderr
    resumed = read(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [4, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


@pytest.mark.slow
def test_sigterm_to_every_process_with_data_workers_saves_and_resumes_exactly(tmp_path):
    """torchrun, a scheduler or the terminal signal the whole process group, data workers too:
    they leave it to the main process, which finishes the step and saves."""
    import os

    steps = {"train": {"max_steps": 40}, "data": {"num_workers": 2}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_cli("train", str(small_config(tmp_path / "a", **steps))).returncode == 0
    reference = read(tmp_path / "a" / "out" / "metrics.jsonl")
    cfg = small_config(tmp_path / "b", **steps)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockstep", "train", str(cfg)], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    wait_for_step(tmp_path / "b" / "out", 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    saved = checkpoint_folders(tmp_path / "b" / "out")
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    at = json.loads((saved[0] / "state.json").read_text())["step"]
    assert at < 40
    res = run_cli("train", str(cfg))
    assert res.returncode == 0 and f"at step {at}" in res.stderr, res.stderr
    resumed = read(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 41))
    for key in ("loss", "batch_sha", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key


def checkpoint_folders(out):
    return sorted((out / "checkpoints").iterdir())


# ---------------------------------------------------------------- damaged checkpoints


class _RunsCode:  # pickled into a crafted file: weights-only loading must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


def _garbage(path):
    path.write_bytes(b"\x00garbage" * 10)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _crafted_pickle(path):
    import torch

    torch.save({"state": _RunsCode()}, path)


DAMAGE = {  # file of the newest checkpoint -> how it is damaged
    "optimizer garbage": ("optimizer.pt", _garbage),
    "optimizer that would run code": ("optimizer.pt", _crafted_pickle),
    "scheduler truncated": ("scheduler.pt", _truncate),
    "rng truncated": ("rng-rank-0.pt", _truncate),
    "weights garbage": ("model.safetensors", _garbage),
    "state garbage": ("state.json", _garbage),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    cfg = small_config(folder, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    return folder


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=[] if c in ("optimizer that would run code", "rng truncated")
                     else [pytest.mark.slow])
        for c in sorted(DAMAGE)
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_way_on(
    two_checkpoints, tmp_path, case
):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace(str(two_checkpoints), str(tmp_path)))
    root = tmp_path / "out" / "checkpoints"
    name, damage = DAMAGE[case]
    damage(root / "step-00000004" / name)
    res = run_cli("train", str(cfg), "train.max_steps=6")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "this must never run" not in res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lockstep: error: ") and "step-00000004" in last
    assert name in last
    hint = f"To resume from the previous complete checkpoint: checkpoint.resume={root / 'step-00000002'}"
    assert last.endswith(hint)
    res = run_cli(
        "train", str(cfg), "train.max_steps=6", f"checkpoint.resume={root / 'step-00000002'}"
    )
    assert res.returncode == 0 and "step-00000002 at step 2" in res.stderr


def test_why_a_checkpoint_write_failed_in_words(tmp_path):
    import errno

    from lockstep.training.checkpoint import why_not_written

    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert (
        why_not_written(short_write, tmp_path, free=1 << 20)
        == "no space left on device (1.0 MiB free)"
    )
    assert why_not_written(short_write, tmp_path, free=1 << 40).startswith(
        "a file could not be written completely (disk full"
    )
    full = OSError(errno.ENOSPC, "No space left on device")
    assert why_not_written(full, tmp_path, free=1 << 40).startswith("no space left on device")
    too_big = OSError(errno.EFBIG, "File too large")
    assert why_not_written(too_big, tmp_path, free=1 << 40).startswith("file too large")


@pytest.mark.slow  # the default suite's 10 minutes; CI runs it
def test_resuming_with_another_thread_count_says_it_is_not_bit_exact(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert run_cli("train", str(cfg), env={"OMP_NUM_THREADS": "1"}).returncode == 0
    state = json.loads((tmp_path / "out/checkpoints/step-00000002/state.json").read_text())
    assert state["threads"] == 1
    res = run_cli("train", str(cfg), "train.max_steps=3", env={"OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr
    assert "written with 1 CPU threads, this run uses 2" in res.stderr
    assert "OMP_NUM_THREADS=1" in res.stderr
    res = run_cli("train", str(cfg), "train.max_steps=4", env={"OMP_NUM_THREADS": "2"})
    assert res.returncode == 0 and "CPU threads" not in res.stderr  # step 3 was written with 2


# ---------------------------------------------------------------- checkpoints of earlier versions

OLD = ROOT / "tests" / "fixtures" / "checkpoints-0.1.0"


@pytest.mark.parametrize("layout", ["plain", pytest.param("sharded", marks=pytest.mark.slow)])
def test_a_checkpoint_written_by_lockstep_0_1_0_resumes_where_that_run_went_on(tmp_path, layout):
    """Checkpoints written by lockstep 0.1.0 (a LoRA run stopped after step 2 of 4; `sharded`:
    FSDP on 2 processes, keyed under the loss module's attribute) resume in this version: the
    steps after the checkpoint log what the 0.1.0 run that was not stopped logged."""
    lora = {"method": "lora", "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    cfg = small_config(
        tmp_path, finetune=lora, train={"max_steps": 4, "strategy": "fsdp" if layout == "sharded" else "ddp"},
        data={"train": [{"path": "builtin:demo_train.jsonl", "format": "alpaca"}]},
        checkpoint={"every_steps": 2},
    )  # fmt: skip
    shutil.copytree(
        OLD / layout / "step-00000002", tmp_path / "out" / "checkpoints" / "step-00000002"
    )
    args = ["--nproc-per-node", "2"] if layout == "sharded" else []
    res = run_cli("train", str(cfg), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000002 at step 2 (checkpoint.resume)" in res.stderr
    rows = {r["step"]: r for r in read(tmp_path / "out" / "metrics.jsonl") if "loss" in r}
    expected = {r["step"]: r for r in read(OLD / layout / "uninterrupted-metrics.jsonl")}
    assert sorted(rows) == [3, 4]
    for step in (3, 4):
        assert rows[step]["batch_sha"] == expected[step]["batch_sha"]
        for key in ("loss", "grad_norm", "lr"):
            assert rows[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


def test_sharded_checkpoints_are_keyed_by_the_models_own_parameter_names(tmp_path):
    """The keys of a sharded checkpoint are the trained model's parameter names (PEFT's, for a
    LoRA run), whatever module the loop wraps the model in; state.json says so. Nothing frozen
    is in it, not even the output head tied to the embeddings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lockstep.training import sharded

    lora = {"method": "lora", "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    cfg = small_config(tmp_path, finetune=lora, train={"max_steps": 1, "strategy": "fsdp"})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000001"
    assert json.loads((ckpt / "state.json").read_text())["sharded_names"] == "model"
    keys = {k for k in sharded.read_metadata(ckpt).state_dict_metadata if k.startswith("model.")}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base")
    trained = PeftModel.from_pretrained(base, tmp_path / "out" / "final")
    assert keys == {f"model.{n}" for n, p in trained.named_parameters() if "lora_" in n}
