"""LoRA and freeze: only what should train changes; exports merge exactly; QLoRA needs CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, small_config
from safetensors.torch import load_file

from lockstep.config import ModelConfig
from lockstep.model.load import load_model, load_tokenizer

IDS = torch.tensor([[1, 40, 50, 60, 70, 2, 1, 80]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A local base model folder, as a user's save_pretrained model would be."""
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    load_model(ModelConfig(), init_seed=11).save_pretrained(folder)
    load_tokenizer(ModelConfig()).save_pretrained(folder)
    return folder


def train(tmp_path, base, **finetune):
    cfg = small_config(tmp_path, model={"path": str(base)}, finetune=finetune,
                       optim={"lr": 5e-3, "warmup_steps": 0}, train={"max_steps": 4})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    return tmp_path / "out"


def test_lora_trains_only_the_adapter_and_exports_merged(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train(tmp_path, base, method="lora", lora={"r": 4, "alpha": 8})
    ckpt = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)  # only adapter weights are checkpointed
    assert (out / "final" / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "final")
    original = load_file(base / "model.safetensors")
    state = model.get_base_model().state_dict()
    for name, tensor in original.items():  # the base weights are untouched
        key = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state.get(key, state.get(name)), tensor), name
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained

    res = run_cli("export", str(out), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(IDS).logits,
                                  AutoModelForCausalLM.from_pretrained(base)(IDS).logits)  # fmt: skip


def test_lora_on_the_builtin_model_saves_a_loadable_base(tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = small_config(tmp_path, finetune={"method": "lora"}, train={"max_steps": 2})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    with torch.no_grad():
        assert model(IDS).logits.shape[-1] == 2048


def test_freeze_keeps_frozen_weights_bit_identical(tmp_path, base):
    out = train(tmp_path, base, method="freeze", freeze={"trainable_layers": 1})
    before, after = (
        load_file(base / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    trained = [k for k in before if k.startswith("model.layers.3.")]
    frozen = [k for k in before if k not in trained]
    assert trained and frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if "norm" not in k)
    ckpt = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    assert sorted(ckpt) == sorted(trained)  # only trainable parameters are checkpointed


@pytest.mark.slow
def test_freeze_by_module_pattern_and_config_errors(tmp_path, base):
    out = train(tmp_path, base, method="freeze", freeze={"trainable_modules": ["*.mlp.*"]})
    ckpt = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ckpt and all(".mlp." in k for k in ckpt)
    cfg = small_config(tmp_path, finetune={"method": "freeze"}, output_dir=str(tmp_path / "new"))
    res = run_cli("train", str(cfg))
    assert (
        res.returncode == 1
        and "needs exactly one of finetune.freeze.trainable_layers" in res.stderr
    )
    res = run_cli("train", str(cfg), "finetune.freeze.trainable_modules=[nothing*]")
    assert res.returncode == 1 and "match no parameter" in res.stderr


def test_qlora_on_cpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA is allowed here")
    cfg = small_config(tmp_path, finetune={"method": "lora", "lora": {"quantize": "4bit"}})
    res = run_cli("train", str(cfg))
    assert res.returncode == 1
    assert "finetune.lora.quantize=4bit (QLoRA) needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("finetune", "trains"),
    [
        ({"method": "lora", "lora": {"r": 4}}, "lora_"),
        ({"method": "freeze", "freeze": {"trainable_layers": 1}}, "layers.{last}."),
    ],
)
def test_mixed_precision_holds_frozen_weights_in_bfloat16(tmp_path, base, finetune, trains):
    """model.dtype=bfloat16 with float32 master weights: only what trains is float32; the
    frozen rest is held in bfloat16 (half its memory), and the run trains."""
    from lockstep import config
    from lockstep.dist import Dist
    from lockstep.model import attention
    from lockstep.training.build import build_model

    cfg = config.load(small_config(tmp_path, model={"path": str(base), "dtype": "bfloat16"},
                                   finetune=finetune))  # fmt: skip
    cpu = torch.device("cpu")
    attn = attention.choose(cfg.model, cpu, False, attention.model_support(cfg.model))
    model = build_model(cfg, seed=1, d=Dist(), attn=attn)
    trains = trains.format(last=model.config.num_hidden_layers - 1)
    for name, p in model.named_parameters():
        expected = torch.float32 if p.requires_grad else torch.bfloat16
        assert p.dtype == expected, name
        assert p.requires_grad == (trains in name), name
    res = run_cli("train", str(tmp_path / "cfg.yaml"), "train.max_steps=2")
    assert res.returncode == 0, res.stderr
    saved = load_file(tmp_path / "out" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
