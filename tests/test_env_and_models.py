"""`lockstep env`, and training on real Hugging Face folders made with save_pretrained."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli, small_config

from lockstep.report.metrics import read


def test_env_reports_versions_and_where_lockstep_comes_from():
    res = run_cli("env")
    assert res.returncode == 0, res.stderr
    for key in (
        "lockstep",
        "python",
        "torch",
        "transformers",
        "peft",
        "datasets",
        "accelerator",
        "device_count",
        "cuda",
        "nccl",
        "lockstep_path",
        "lockstep_install",
    ):
        assert any(line.split()[0] == key for line in res.stdout.splitlines()), key
    info = json.loads(run_cli("env", "--json").stdout)
    assert info["lockstep_path"] == str(ROOT / "src" / "lockstep")
    assert info["lockstep_install"] in (
        "editable",
        "source (not installed; imported from the path)",
    )
    commit = info["lockstep_git_commit"]
    if (ROOT / ".git").exists() and commit is not None:
        assert len(commit.split()[0]) == 40


def save_hf_folder(tmp_path, arch: str):
    """A small random model of a real architecture, saved as a user's local folder would be."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from lockstep.model.load import BUILTIN_DIR

    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls, cfg_cls = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "llama": (LlamaForCausalLM, LlamaConfig),
    }[arch]
    model = cls(cfg_cls(**common))
    folder = tmp_path / f"my-{arch}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_trains_a_local_save_pretrained_folder(tmp_path, alpaca_file, arch):
    folder = save_hf_folder(tmp_path, arch)
    cfg = small_config(tmp_path, alpaca_file, model={"path": str(folder)})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    rows = read(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    saved = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert saved["model_type"] == arch


def test_model_path_errors(tmp_path, alpaca_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("train", str(small_config(tmp_path, alpaca_file, model={"path": str(empty)})))
    assert res.returncode == 1 and "has no config.json" in res.stderr
    res = run_cli("train", str(small_config(tmp_path, alpaca_file, model={"path": "builtin:huge"})))
    assert res.returncode == 1 and "unknown built-in model 'builtin:huge'" in res.stderr
    assert "builtin:tiny" in res.stderr


def test_hub_ids_are_told_from_local_paths_in_one_place(tmp_path):
    # model.path, data paths and an adapter's base ask lockstep.hub the same question
    from lockstep import hub
    from lockstep.data import sources
    from lockstep.errors import ModelError
    from lockstep.infer import _adapter_base
    from lockstep.model.load import resolve

    for name, is_id in [("org/name", True), ("name", True), ("./name", False), ("/abs/x", False),
                        ("~/x", False), ("a/b/c", False)]:  # fmt: skip
        assert hub.looks_like_id(name) is is_id, name
    with pytest.raises(ModelError, match=r"model.path: folder 'a/b/c' not found"):
        resolve("a/b/c")
    assert sources.is_hub_name("org/dataset") and not sources.is_hub_name("a/b/c")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "a/b/c"}))
    with pytest.raises(ModelError, match=r"its base model 'a/b/c' .* is not there"):
        _adapter_base(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "o/m"}))
    assert _adapter_base(adapter) == "o/m"  # a hub id: transformers resolves it
