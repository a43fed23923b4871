"""bench/vs_peers: the realistic fixture's data, the matmul peak, and the model FLOPs that
run.py divides by the training time (checked against torch's own FLOP counter on real forward
and backward passes: full fine-tuning, PEFT LoRA, and lockstep's target-only loss)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

ROOT = Path(__file__).resolve().parents[1]
VS_PEERS = ROOT / "bench" / "vs_peers"

SHAPE = {  # a tiny Llama with the realistic fixture's traits: GQA, SiLU MLP, untied head
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": False,
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"vs_peers_{name}", VS_PEERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # eager attention: its matmuls are ones torch's FLOP counter sees (it does not count the
    # CPU's fused sdpa kernel); the FLOPs are the same
    cfg = LlamaConfig(**SHAPE, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def addmm_flop(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """self + a @ b: 2 FLOPs per multiply-add of a [m, k] @ [k, n] product."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted(step) -> int:
    """FLOPs torch counts for one forward + backward (`step` returns the loss); in-place addmm_
    (lockstep's loss accumulates the LM head's weight gradient with it) counted as addmm is."""
    with FlopCounterMode(display=False, custom_mapping={aten.addmm_: addmm_flop}) as counter:
        step().backward()
    return counter.get_total_flops()


def test_full_finetune_flops_match_torch_count():
    run = load("run")
    model = tiny_llama()
    n = 24
    ids = torch.randint(0, SHAPE["vocab_size"], (1, n))
    got = counted(lambda: model(input_ids=ids, labels=ids).loss)
    # one sample of n tokens: every token attends over n; the head on every position
    want = run.model_flops(SHAPE, n, "full", 8, tokens=n, head_positions=n)
    assert got == pytest.approx(want, rel=1e-3)  # RoPE's tiny frequency matmul aside


def test_lora_flops_match_torch_count_up_to_layer_zero_input_gradients():
    from peft import LoraConfig, get_peft_model

    run = load("run")
    r = 4
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    n = 24
    ids = torch.randint(0, SHAPE["vocab_size"], (1, n))
    got = counted(lambda: model(input_ids=ids, labels=ids).loss)
    want = run.model_flops(SHAPE, n, "lora", r, tokens=n, head_positions=n)
    # the docstring's one overcount: layer 0's q, k, v read the (frozen) embedding's output and
    # need no input gradient, for the base weight nor the adapter (its MLP reads the attention's
    # output, which does)
    h, q = SHAPE["hidden_size"], SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    outs = [q, kv, kv]
    skipped = 2 * n * sum(h * o + h * r for o in outs)
    assert got == pytest.approx(want - skipped, rel=1e-3)
    assert got < want


def test_lockstep_runs_the_head_on_target_tokens_only():
    """run.py counts lockstep's LM head on target tokens: its training loss really does that."""
    from lockstep.training.loss import CausalLMLoss

    run = load("run")
    model = tiny_llama()
    loss = CausalLMLoss(model, chunk=8)
    n, targets = 24, 9
    ids = torch.randint(0, SHAPE["vocab_size"], (1, n))
    labels = ids.clone()
    labels[0, : n - targets] = -100
    batch = {"input_ids": ids, "labels": labels}
    got = counted(lambda: loss(batch))
    want = run.model_flops(SHAPE, n, "full", 8, tokens=n, head_positions=targets)
    assert got == pytest.approx(want, rel=1e-3)
    everywhere = run.model_flops(SHAPE, n, "full", 8, tokens=n, head_positions=n)
    assert got < everywhere - 6 * SHAPE["vocab_size"] * SHAPE["hidden_size"] * (n - targets) / 2


def test_matmul_peak_reports_the_best_size():
    out = subprocess.run(
        [sys.executable, str(VS_PEERS / "matmul_peak.py"), "--sizes", "64", "128",
         "--seconds", "0.05", "--trials", "2", "--threads", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    peak = json.loads(out.stdout)
    assert set(peak["by_size"]) == {"64", "128"}
    assert peak["gflops"] == max(peak["by_size"].values()) > 0
    assert peak["threads"] == 1 and peak["dtype"] == "float32"


def test_realistic_records_have_chat_lengths(tmp_path):
    """The realistic generator: median ~120-150 tokens, a long tail, nothing over the cap; the
    small fixture's generator is untouched (its first records are pinned)."""
    import random
    import shutil

    from transformers import AutoTokenizer

    assets = load("make_assets")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.TOKENIZER_DIR / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(assets.CHAT_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    _, lengths = assets.make_data(tok, 1000, 0, 2000, lognormal=True)
    lengths.sort()
    assert 110 <= lengths[500] <= 160
    assert lengths[900] >= 300 and 1000 <= lengths[-1] <= 2000
    small = assets.make_record(random.Random(0))
    assert small["instruction"].startswith("Return the last word.\n\nsoft car milk wet tree")
    assert len(small["instruction"].split()) == 4 + 39 and small["output"] == "dog"


def test_the_ordered_file_gives_each_step_lockstep_s_global_batch(tmp_path):
    """make_assets' train-ordered.jsonl, read sequentially (as the peers read it without
    packing), gives step k the records lockstep trains on at step k: checked against the ids a
    real lockstep run logs (log.sample_ids), through the config's seed."""
    import yaml
    from conftest import run_cli, write_jsonl

    assets = load("make_assets")
    records = [
        {"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * (1 + i % 7)}
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    seed, size, steps = 5, 8, 3
    ordered = assets.in_lockstep_order(records, seed)
    assert sorted(r["instruction"] for r in ordered) == sorted(r["instruction"] for r in records)
    cfg = {
        "output_dir": str(tmp_path / "out"), "seed": seed,
        "data": {"train": [{"path": str(data)}], "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "batch": {"global_size": size, "micro_size": 4}, "train": {"max_steps": steps},
        "log": {"sample_ids": True},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("train", str(tmp_path / "cfg.yaml"))
    assert res.returncode == 0, res.stderr
    logged = (tmp_path / "out" / "sample_ids" / "rank-0-of-1.jsonl").read_text().splitlines()
    by_step: dict[int, list[int]] = {}
    for row in map(json.loads, logged):
        by_step.setdefault(row["step"], []).extend(row["ids"])
    assert sorted(by_step) == [1, 2, 3]
    for k, ids in by_step.items():
        trained = sorted(records[i]["instruction"] for i in ids)
        read = sorted(r["instruction"] for r in ordered[(k - 1) * size : k * size])
        assert trained == read, k
