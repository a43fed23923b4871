"""FSDP2 on CPU (gloo, 2 processes): DDP's numbers, sharded checkpoints that resume exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, small_config
from safetensors.torch import load_file

from lockstep.report.metrics import read


def train_rows(out):
    return [r for r in read(out / "metrics.jsonl") if "loss" in r]


pytestmark = pytest.mark.slow  # torchrun runs: the README's test command and CI run them

STEPS = 10
SECTIONS = {
    "train": {"max_steps": STEPS},
    "checkpoint": {"every_steps": 5},
    "data": {"val_fraction": 0.05},  # eval_loss every 5 steps: a sharded forward on every rank
    "eval": {"every_steps": 5},
}


def train(folder, *args: str, ok: bool = True):
    folder.mkdir(exist_ok=True)
    cfg = small_config(folder, **SECTIONS)
    res = run_cli("train", str(cfg), *args)
    if ok:
        assert res.returncode == 0, res.stderr
    return res, folder / "out"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _, ddp = train(tmp / "ddp", "--nproc-per-node", "2", "train.strategy=ddp")
    _, fsdp = train(tmp / "fsdp", "--nproc-per-node", "2", "train.strategy=fsdp")
    return {"ddp": ddp, "fsdp": fsdp, "tmp": tmp}


def test_ddp_and_fsdp_give_the_same_losses(runs):
    ddp_eval = [r["eval_loss"] for r in read(runs["ddp"] / "metrics.jsonl") if "eval_loss" in r]
    fsdp_eval = [r["eval_loss"] for r in read(runs["fsdp"] / "metrics.jsonl") if "eval_loss" in r]
    assert len(ddp_eval) == 2
    assert fsdp_eval == pytest.approx(ddp_eval, rel=1e-4)
    ddp, fsdp = train_rows(runs["ddp"]), train_rows(runs["fsdp"])
    assert [r["batch_sha"] for r in fsdp] == [r["batch_sha"] for r in ddp]
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], rel=1e-4)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in ddp], rel=1e-3)
    assert ddp[-1]["loss"] < ddp[0]["loss"]


def test_fsdp_checkpoints_are_sharded_and_the_final_model_is_whole(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000005"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one file per rank
    ddp = load_file(runs["ddp"] / "final" / "model.safetensors")
    fsdp = load_file(runs["fsdp"] / "final" / "model.safetensors")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-3, atol=1e-4, msg=name)


def test_sharded_checkpoint_resumes_exactly(runs):
    folder = runs["tmp"] / "interrupted"
    args = ("--nproc-per-node", "2", "train.strategy=fsdp")
    res, out = train(folder, *args, "testing.fail_at_step=8", ok=False)
    assert res.returncode != 0 and "injected failure at step 8" in res.stderr
    res, out = train(folder, *args)
    assert "resuming from" in res.stderr and "step-00000005" in res.stderr
    reference, resumed = train_rows(runs["fsdp"]), train_rows(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "batch_sha"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    a = load_file(runs["fsdp"] / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_resumes_on_one_process_and_exports(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000005"
    one = runs["tmp"] / "one"
    res, out = train(one, "train.strategy=fsdp", f"checkpoint.resume={ckpt}")
    reference, resumed = train_rows(runs["fsdp"]), train_rows(out)
    assert [r["step"] for r in resumed] == list(range(6, STEPS + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference[5:]],
                                                         rel=1e-4)  # fmt: skip
    exported = runs["tmp"] / "exported"
    res = run_cli("export", str(ckpt), "--out", str(exported))
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    assert sum(p.numel() for p in model.parameters()) > 3_000_000


def test_a_ddp_checkpoint_is_refused_by_a_sharded_run_in_words(runs, tmp_path):
    ckpt = runs["ddp"] / "checkpoints" / "step-00000005"
    res, _ = train(tmp_path / "x", "--nproc-per-node", "2", "train.strategy=fsdp",
                   f"checkpoint.resume={ckpt}", ok=False)  # fmt: skip
    assert res.returncode != 0
    assert "train.strategy=ddp" in res.stderr and "sharded" in res.stderr


def test_lora_under_fsdp_trains_the_same_adapter_as_ddp(tmp_path):
    adapters = {}
    for strategy in ("ddp", "fsdp"):
        _, out = train(tmp_path / strategy, "--nproc-per-node", "2", f"train.strategy={strategy}",
                       "finetune.method=lora", "train.max_steps=4", "eval.every_steps=null",
                       "data.val_fraction=0")  # fmt: skip
        adapters[strategy] = load_file(out / "final" / "adapter_model.safetensors")
    ddp, fsdp = adapters["ddp"], adapters["fsdp"]
    assert ddp.keys() == fsdp.keys() and any("lora_B" in k for k in ddp)
    assert any(ddp[k].abs().max() > 0 for k in ddp if "lora_B" in k)  # B moved off zero
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-3, atol=1e-5, msg=name)
