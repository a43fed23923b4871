"""Every model family people fine-tune trains, packs without leaks, exports and chats.

Tiny random models of each architecture (tests/chat_templates.py ARCHS: hidden 32, 2 blocks,
the family's chat template) are built with the transformers config classes. The default suite
checks each family in-process (blocks, freeze, LoRA, packing isolation, a short training run);
the CLI train + export + chat per family is slow-marked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_templates import ARCHS, save_tiny_model
from conftest import run_cli, small_config, write_jsonl
from safetensors.torch import load_file
from test_chat import greedy, side_by_side

from lockstep import train as train_entry
from lockstep.config import DataConfig, FinetuneConfig, ModelConfig
from lockstep.data import dataset
from lockstep.data.collate import collate
from lockstep.errors import ConfigError, ModelError
from lockstep.model import adapters
from lockstep.model.load import load_model, load_tokenizer
from lockstep.report.metrics import read
from lockstep.training.loss import CausalLMLoss

ARCH_NAMES = list(ARCHS)
MOE = ["qwen3-moe", "mixtral"]
RECORDS = [
    {"instruction": "Uppercase the words.", "input": f"word{i} river {'stone ' * (i % 5)}",
     "output": f"WORD{i} RIVER {'STONE ' * (i % 5)}".strip()}
    for i in range(24)
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """arch -> a Hugging Face folder of its tiny random model (built once per module)."""
    root = tmp_path_factory.mktemp("families")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCH_NAMES}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "words.jsonl", RECORDS)


def model_config(folder) -> ModelConfig:
    return ModelConfig(path=str(folder))


def family_config(tmp_path, folder, data_file, **sections):
    """A short run on a family's model: 2 steps of 4 samples (packed: rows) of 128 tokens."""
    defaults = {
        "model": {"path": str(folder)},
        "data": {"max_length": 128},
        "batch": {"global_size": 4, "micro_size": 2},
        "train": {"max_steps": 2},
        "optim": {"lr": 5e-3, "warmup_steps": 0},
    }
    for key, value in sections.items():
        defaults[key] = {**defaults.get(key, {}), **value}
    return small_config(tmp_path, data_file, **defaults)  # merged over its sections


def train_in_process(cfg, capfd, *overrides: str) -> str:
    """`python -m lockstep.train CFG` in this process (as an IDE runs it); its log."""
    code = train_entry.main([str(cfg), *overrides])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    return err


# ---------------------------------------------------------------- blocks, freeze, LoRA


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_blocks_are_found_and_freeze_trains_the_last(arch, models):
    model = load_model(model_config(models[arch]), init_seed=0)
    prefix, blocks = adapters.find_blocks(model)
    assert len(blocks) == 2 and adapters.blocks(model) is blocks
    assert prefix == {"gpt2": "transformer.h", "gpt-neox": "gpt_neox.layers"}.get(
        arch, "model.layers"
    )
    cfg = FinetuneConfig(method="freeze", freeze={"trainable_layers": 1})
    adapters.apply(cfg, model, init_seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(f"{prefix}.1.")}
    assert f"blocks train ({prefix}.1)" in adapters.describe(cfg, model)


def test_blocks_of_a_model_that_names_none(models):
    """A model without _no_split_modules (remote code): the ModuleList of one repeated class."""
    model = load_model(model_config(models["gpt2"]), init_seed=0)
    model._no_split_modules = None
    assert adapters.find_blocks(model)[0] == "transformer.h"
    with pytest.raises(ModelError, match="Linear: cannot find its transformer blocks"):
        adapters.blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lora_wraps_every_block_and_its_adapters_get_gradients(arch, models, data_file):
    folder = models[arch]
    tok = load_tokenizer(model_config(folder))
    samples = dataset.build(DataConfig(train=[{"path": str(data_file)}], max_length=64), tok)
    cfg = FinetuneConfig(method="lora", lora={"r": 4})
    model = adapters.apply(cfg, load_model(model_config(folder), init_seed=0), init_seed=1)
    line = adapters.describe(cfg, model)
    assert "x 2 layers" in line and "parameters train" in line, line
    engine = CausalLMLoss(model, chunk=16)
    engine(collate(samples, np.arange(4), tok.pad_token_id)).backward()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_packed_rows_give_each_sample_its_own_logits_and_loss(arch, models, data_file):
    """Two packed rows in one micro-batch, through lockstep's collate and loss: each sample's
    logits equal its logits alone, and the batch's summed loss is the samples' losses summed."""
    folder = models[arch]
    tok = load_tokenizer(model_config(folder))
    data = {"train": [{"path": str(data_file)}], "max_length": 128}
    plain = dataset.build(DataConfig(**data), tok)
    packed = dataset.build(DataConfig(**data, packing=True), tok)
    rows = [i for i in range(len(packed)) if (packed.position_ids[i] == 0).sum() >= 2][:2]
    assert len(rows) == 2
    model = load_model(model_config(folder), init_seed=0).eval()
    batch = collate(packed, np.array(rows), tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
    by_tokens = {tuple(plain.input_ids[i]): i for i in range(len(plain))}
    engine = CausalLMLoss(model, chunk=None)  # the plain loss: logits as the model gives them
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        alone_loss = 0.0
        for r, i in enumerate(rows):
            starts = [*np.flatnonzero(packed.position_ids[i] == 0), len(packed.input_ids[i])]
            for a, b in zip(starts, starts[1:], strict=False):
                sample = by_tokens[tuple(packed.input_ids[i][a:b])]
                ids = torch.from_numpy(plain.input_ids[sample])[None]
                alone = model(input_ids=ids, use_cache=False).logits[0]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-4, rtol=1e-4)
                alone_loss += engine(collate(plain, np.array([sample]), tok.pad_token_id))
        torch.testing.assert_close(engine(batch), alone_loss, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_trains_packed_in_process(arch, models, data_file, tmp_path, capfd):
    cfg = family_config(tmp_path, models[arch], data_file, data={"packing": True})
    log = train_in_process(cfg, capfd)
    rows = [r for r in read(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert "packing:" in log and "finetune: full:" in log
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_gpt2_freezes_all_but_its_last_block(models, data_file, tmp_path, capfd):
    """GPT-2's blocks are transformer.h, not *.layers: freeze finds them like any other."""
    cfg = family_config(tmp_path, models["gpt2"], data_file,
                        finetune={"method": "freeze", "freeze": {"trainable_layers": 1}})  # fmt: skip
    log = train_in_process(cfg, capfd)
    assert "finetune: freeze: the last 1 of 2 blocks train (transformer.h.1)" in log
    before = load_file(models["gpt2"] / "model.safetensors")
    after = load_file(tmp_path / "out" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("transformer.h.1.") for k in changed), changed


@pytest.mark.parametrize("arch", MOE)
def test_lora_on_the_experts_of_a_moe_model(arch, models, data_file, tmp_path, capfd):
    cfg = family_config(tmp_path, models[arch], data_file,
                        finetune={"method": "lora", "lora": {"r": 4, "target_parameters": "experts"}},
                        train={"max_steps": 2, "loss_chunk": 16})  # fmt: skip
    log = train_in_process(cfg, capfd)
    plan = next(line for line in log.splitlines() if "finetune: LoRA r=4 on" in line)
    assert "experts.gate_up_proj" in plan and "experts.down_proj" in plan, plan
    assert "q_proj, k_proj, v_proj, o_proj" in plan and "x 2 layers" in plan, plan
    ckpt = load_file(tmp_path / "out" / "checkpoints" / "step-00000002" / "model.safetensors")
    experts = {k: v for k, v in ckpt.items() if ".experts." in k}
    assert all("lora_" in k for k in ckpt)  # only adapters are checkpointed
    for layer in (0, 1):  # both expert weights of both blocks got adapters, and they trained
        for lora_b in [k for k in experts if f"layers.{layer}.mlp" in k and "lora_B" in k]:
            assert experts[lora_b].abs().sum() > 0, lora_b
        assert len([k for k in experts if f"layers.{layer}.mlp" in k and "lora_B" in k]) == 2


def test_lora_target_parameters_that_match_nothing_are_refused(models, data_file, tmp_path,
                                                               capfd):  # fmt: skip
    cfg = family_config(tmp_path, models["qwen3-moe"], data_file,
                        finetune={"method": "lora", "lora": {"target_parameters": ["w1"]}})  # fmt: skip
    assert train_entry.main([str(cfg)]) == 1
    err = capfd.readouterr().err
    assert (
        "lockstep: error: finetune.lora.target_parameters: 'w1' matches no parameter of "
        "Qwen3MoeForCausalLM"
        in err
        and "'model.layers.0.mlp.experts.gate_up_proj'" in err
    )
    assert "Traceback" not in err
    model = load_model(model_config(models["llama"]), init_seed=0)
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no expert weights"):
        adapters.apply(FinetuneConfig(method="lora", lora={"target_parameters": "experts"}),
                       model, init_seed=0)  # fmt: skip
    with pytest.raises(ConfigError, match="finetune.lora.dropout=0.1; set finetune.lora.dropout"):
        adapters.apply(FinetuneConfig(method="lora", lora={"target_parameters": "experts",
                                                           "dropout": 0.1}),
                       load_model(model_config(models["mixtral"]), init_seed=0), init_seed=0)  # fmt: skip


# ---------------------------------------------------------------- the CLI, per family (slow)


def chat_answers(**models: str) -> dict[str, str]:
    """`lockstep chat MODEL --prompt ...` (greedy) for each model, side by side: the answers."""
    prompt = "Uppercase the words.\n\nword1 river"
    done = side_by_side(
        **{k: greedy(m, prompt, "--max-new-tokens", "6") for k, m in models.items()}
    )
    for proc in done.values():
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "chat:" in proc.stderr and proc.stdout  # a random model may answer blanks
    return {k: proc.stdout for k, proc in done.items()}


@pytest.mark.slow  # four CLI runs and two chats per family (~90 s on two busy cores)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cli_trains_exports_and_chats(arch, models, data_file, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 40, 50, 60, 70, 80]])
    # full fine-tuning on packed rows, then export: a folder from_pretrained loads
    full = tmp_path / "full"
    full.mkdir()
    res = run_cli("train", str(family_config(full, models[arch], data_file,
                                             data={"packing": True})))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("export", str(full / "out"), "--out", str(tmp_path / "full-export"))
    assert res.returncode == 0, res.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full-export")
    final = AutoModelForCausalLM.from_pretrained(full / "out" / "final")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, final(ids).logits)
    # LoRA (on the experts too, for a MoE model), export merged, chat with the run and export
    lora = tmp_path / "lora"
    lora.mkdir()
    settings = {"r": 4, **({"target_parameters": "experts"} if arch in MOE else {})}
    res = run_cli("train", str(family_config(lora, models[arch], data_file,
                                             finetune={"method": "lora", "lora": settings})))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finetune: LoRA r=4 on" in res.stderr
    res = run_cli("export", str(lora / "out"), "--out", str(tmp_path / "lora-export"))
    assert res.returncode == 0, res.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-export")
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora / "out" / "final")
    assert not any("lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)
    answers = chat_answers(run=str(lora / "out"), merged=str(tmp_path / "lora-export"))
    assert answers["run"] == answers["merged"]  # the adapter on its base answers as merged


@pytest.mark.slow  # torchrun, 2 processes (~45 s on two busy cores)
def test_gpt2_trains_sharded_with_fsdp(models, data_file, tmp_path):
    """GPT-2's blocks (transformer.h) are FSDP's units, under torchrun on gloo."""
    cfg = family_config(tmp_path, models["gpt2"], data_file, train={"strategy": "fsdp"})
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([r for r in read(tmp_path / "out" / "metrics.jsonl") if "loss" in r]) == 2
    assert (tmp_path / "out" / "checkpoints" / "step-00000002" / "sharded").is_dir()
