"""Packing never leaks across samples, and is a deterministic function of the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, run_cli, small_config

from lockstep.config import DataConfig, ModelConfig
from lockstep.data import dataset
from lockstep.data.collate import collate
from lockstep.data.packing import assign
from lockstep.data.render import IGNORE
from lockstep.model.load import load_model, load_tokenizer
from lockstep.report.metrics import read


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def demo(tok, **data):
    cfg = DataConfig(train=[{"path": str(DEMO_DATA), "max_samples": 200}], max_length=128, **data)
    return dataset.build(cfg, tok)


def test_logits_inside_a_pack_equal_the_sample_alone(tok):
    plain, packed = demo(tok), demo(tok, packing=True)
    model = load_model(ModelConfig(), init_seed=3).eval()
    group = next(g for g in assign([len(x) for x in plain.input_ids], 128) if len(g) >= 3)
    pack_index = [p[0] for p in assign([len(x) for x in plain.input_ids], 128)].index(group[0])
    batch = collate(packed, np.array([pack_index]), tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        in_pack = model(**inputs, use_cache=False).logits[0]
        offset = 0
        for i in group:
            alone = model(input_ids=torch.from_numpy(plain.input_ids[i])[None]).logits[0]
            n = len(alone)
            torch.testing.assert_close(in_pack[offset : offset + n], alone, atol=1e-4, rtol=1e-4)
            offset += n


def test_pack_labels_never_cross_a_boundary(tok):
    plain, packed = demo(tok), demo(tok, packing=True)
    assert sum(packed.target_tokens(i) for i in range(len(packed))) == sum(
        plain.target_tokens(i) for i in range(len(plain))
    )
    for i in range(len(packed)):
        starts = np.flatnonzero(packed.position_ids[i] == 0)
        assert (packed.labels[i][starts] == IGNORE).all()
        assert len(packed.input_ids[i]) <= 128


def test_packing_is_deterministic_and_dense(tok):
    a, b = demo(tok, packing=True), demo(tok, packing=True)
    assert [x.tolist() for x in a.input_ids] == [x.tolist() for x in b.input_ids]
    assert a.stats.packing_efficiency > 0.9
    assert len(a) < len(demo(tok)) / 3
    groups = assign([5, 3, 7, 2, 8, 1], 10)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(sum([5, 3, 7, 2, 8, 1][i] for i in g) <= 10 for g in groups)


def test_packed_training_through_the_cli(tmp_path):
    cfg = small_config(tmp_path, data={"max_length": 128, "packing": True},
                       batch={"global_size": 4, "micro_size": 2})  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr
    assert "packing: 2000 samples into" in res.stderr and "real tokens" in res.stderr
    rows = read(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 3 and rows[0]["tokens"] > 4 * 100  # packs, not single samples
    res = run_cli("data", "preview", str(cfg), "-n", "1")
    assert "packing:        " in res.stdout and res.stdout.count("<|im_start|>user") > 2
