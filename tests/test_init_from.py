"""finetune.lora.init_from: LoRA training that starts from an existing PEFT adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, small_config, write_jsonl
from safetensors.torch import load_file, save_file

from lockstep.report.metrics import read

RECORDS = [
    {"instruction": "Uppercase the words.", "input": f"word{i} river", "output": f"WORD{i} RIVER"}
    for i in range(24)
]


def _config(folder, data, **sections):
    """One optimizer step is the whole data (global batch 24), so a step's loss is the loss of
    the model over the data: the eval loss of the same model on the same file."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"data": {"eval": [{"path": str(data), "format": "alpaca"}]},
            "batch": {"global_size": 24, "micro_size": 8},
            "optim": {"lr": 1e-2, "warmup_steps": 0}}  # fmt: skip
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return small_config(folder, data, **base)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A LoRA run on the built-in model: its final/ adapter, and base/ beside it."""
    root = tmp_path_factory.mktemp("adapter_run")
    data = write_jsonl(root / "small.jsonl", RECORDS)
    cfg = _config(root, data, finetune={"method": "lora", "lora": {"r": 4, "alpha": 8}},
                  train={"max_steps": 3})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    return root / "out", data


def _continued(folder, out, data, adapter, **sections):
    lora = {"method": "lora", "lora": {"init_from": str(adapter)}}
    return _config(folder, data, model={"path": str(out / "base")}, finetune=lora,
                   train={"max_steps": 2}, checkpoint={"every_steps": 1}, **sections)  # fmt: skip


def test_a_run_from_an_adapter_starts_from_its_weights(tmp_path, adapter_run):
    out, data = adapter_run
    first = read(out / "metrics.jsonl")
    adapter_eval = [r["eval_loss"] for r in first if "eval_loss" in r][-1]  # after step 3
    base_loss = first[0]["loss"]  # step 1: the fresh adapter (B = 0) is the base model
    cfg = _continued(tmp_path, out, data, out / "final")
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert f"starting from the adapter {out / 'final'}" in res.stderr
    assert "finetune: LoRA r=4 on" in res.stderr  # r read from the adapter (the default is 8)
    assert "trained on" not in res.stderr  # its recorded base is model.path: no warning
    rows = [r for r in read(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] == pytest.approx(adapter_eval, rel=1e-5, abs=1e-6)
    assert abs(rows[0]["loss"] - base_loss) > 1e-3  # what a run ignoring init_from would log
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step-00000001" / "state.json")
                       .read_text())  # fmt: skip
    assert len(saved["init_from_adapter"]) == 16
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "init_from:" in config and "r: 4" in config and "alpha: 8.0" in config


@pytest.mark.slow
def test_a_resume_restores_the_checkpoint_and_names_a_changed_adapter(tmp_path, adapter_run):
    out, data = adapter_run
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "final", adapter)
    straight = _continued(tmp_path / "straight", out, data, adapter)
    assert run_cli("train", str(straight)).returncode == 0
    reference = read(tmp_path / "straight" / "out" / "metrics.jsonl")
    cfg = _continued(tmp_path / "stopped", out, data, adapter)
    res = run_cli("train", str(cfg), "testing.fail_at_step=2")  # after step-1's checkpoint
    assert res.returncode == 1 and "injected failure at step 2" in res.stderr

    weights = adapter / "adapter_model.safetensors"
    original = weights.read_bytes()
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)
    res = run_cli("train", str(cfg))
    assert res.returncode == 1
    assert f"the adapter finetune.lora.init_from={adapter} changed since the run started" in (
        res.stderr
    )
    assert "Traceback" not in res.stderr

    weights.write_bytes(original)
    res = run_cli("train", str(cfg))
    assert res.returncode == 0 and "at step 1" in res.stderr, res.stderr
    assert "starting from the adapter" not in res.stderr  # the checkpoint, not the adapter
    resumed = read(tmp_path / "stopped" / "out" / "metrics.jsonl")
    losses = [r["loss"] for r in resumed if "loss" in r]
    assert losses == [r["loss"] for r in reference if "loss" in r] and len(losses) == 2
    assert losses[1] != losses[0]


@pytest.fixture
def fake_adapter(tmp_path):
    """An adapter folder as PEFT writes it; only its config is read before training."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "some/base",
    }))  # fmt: skip
    save_file({"x": torch.zeros(1)}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("finetune.lora.r=16", "finetune.lora.r=16, but the adapter finetune.lora.init_from={a} "
         "has r=4: the adapter decides it; drop finetune.lora.r from the config (or set it to 4)"),
        ("finetune.lora.target_modules=[q_proj]", "finetune.lora.target_modules=['q_proj'], but "
         "the adapter finetune.lora.init_from={a} has target_modules=['q_proj', 'v_proj']"),
        ("finetune.lora.alpha=32", "has lora_alpha=8"),
        ("finetune.method=full", "finetune.lora.init_from starts LoRA from an adapter, but "
         "finetune.method=full: set finetune.method=lora"),
        ("finetune.lora.init_from={a}/missing", "finetune.lora.init_from: '{a}/missing' does "
         "not exist; give a PEFT adapter folder"),
    ],
)  # fmt: skip
def test_settings_the_adapter_decides_cannot_conflict(tmp_path, fake_adapter, override, expected):
    cfg = small_config(
        tmp_path, finetune={"method": "lora", "lora": {"init_from": str(fake_adapter)}}
    )
    res = run_cli("train", str(cfg), "--dry-run", override.format(a=fake_adapter))
    assert res.returncode == 1
    assert expected.format(a=fake_adapter) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_same_values_as_the_adapter_are_accepted(tmp_path, fake_adapter):
    cfg = small_config(
        tmp_path, finetune={"method": "lora", "lora": {"init_from": str(fake_adapter)}}
    )
    res = run_cli("train", str(cfg), "--dry-run", "finetune.lora.r=4",
                  "finetune.lora.target_modules=[q_proj, v_proj]")  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_an_adapter_of_another_base_is_a_warning(tmp_path, fake_adapter):
    from lockstep.config import load
    from lockstep.model.adapters import init_from_base_warning, resolve_init_from

    lora = {"method": "lora", "lora": {"init_from": str(fake_adapter)}}
    cfg = resolve_init_from(load(small_config(tmp_path, finetune=lora)))
    assert (cfg.finetune.lora.r, cfg.finetune.lora.alpha) == (4, 8)
    assert cfg.finetune.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.finetune.lora.dropout == 0.0  # the adapter's
    lora["lora"]["dropout"] = 0.1  # a training setting: the config's own value wins
    assert resolve_init_from(load(small_config(tmp_path, finetune=lora))).finetune.lora == (
        cfg.finetune.lora.model_copy(update={"dropout": 0.1})
    )
    assert init_from_base_warning(cfg) == (
        "finetune.lora.init_from: the adapter was trained on some/base, this run's model.path is "
        "builtin:tiny; training goes on from it if they are the same model"
    )


@pytest.mark.slow
def test_preference_training_from_an_adapter_is_referenced_to_it(tmp_path, adapter_run):
    """DPO's first loss is ln 2 when the reference is the starting model: the base with the
    adapter (auto: precomputed); against the base alone (adapters_off) it is not."""
    out, _ = adapter_run
    pairs = {"train": [{"path": "builtin:demo_pairs.jsonl", "format": "alpaca"}],
             "max_length": 64}  # fmt: skip
    lora = {"stage": "preference", "method": "lora", "lora": {"init_from": str(out / "final")}}
    first = {}
    for reference in ("auto", "adapters_off"):
        folder = tmp_path / reference
        folder.mkdir()
        cfg = small_config(folder, model={"path": str(out / "base")}, finetune=lora, data=pairs,
                           preference={"reference": reference}, train={"max_steps": 1})  # fmt: skip
        res = run_cli("train", str(cfg))
        assert res.returncode == 0, res.stderr
        first[reference] = read(folder / "out" / "metrics.jsonl")[0]["loss"]
    assert first["auto"] == pytest.approx(0.693147, abs=1e-5)
    assert abs(first["adapters_off"] - 0.693147) > 2e-4  # 8e-4: three steps moved the adapter


def test_an_adapter_that_does_not_fit_the_model_is_one_line(tmp_path, fake_adapter):
    """Its weights (here one named `x`) have no place in model.path's LoRA layers."""
    lora = {"method": "lora", "lora": {"init_from": str(fake_adapter)}}
    res = run_cli("train", str(small_config(tmp_path, finetune=lora)))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last == (
        f"lockstep: error: finetune.lora.init_from: the adapter {fake_adapter} does not fit "
        "model.path=builtin:tiny: 1 weights model.path has no place for, e.g. 'x'"
    )
    assert "Traceback" not in res.stderr
