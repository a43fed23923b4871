"""Preference losses against straightforward per-pair arithmetic (the math module, one pair at a
time), on fixed log-probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lockstep.training.preference import PairLogps, Settings, metric_sums, pair_losses

# per pair: policy chosen, policy rejected, reference chosen, reference rejected (summed
# log-probabilities), chosen tokens, rejected tokens
PAIRS = [
    (-12.5, -15.25, -13.0, -14.0, 5, 7),
    (-3.0, -2.5, -3.5, -2.0, 2, 3),
    (-40.0, -41.0, -39.0, -45.5, 16, 11),
]


def logps() -> PairLogps:
    cols = list(zip(*PAIRS, strict=True))
    t = [torch.tensor(c, dtype=torch.float64) for c in cols]
    return PairLogps(chosen=t[0], rejected=t[1], ref_chosen=t[2], ref_rejected=t[3],
                     chosen_tokens=t[4], rejected_tokens=t[5])  # fmt: skip


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected(s: Settings, pw, pl, rw, rl, nw, nl) -> float:
    if s.loss == "dpo":
        h = s.beta * ((pw - rw) - (pl - rl))
        return -(1 - s.label_smoothing) * log_sigmoid(h) - s.label_smoothing * log_sigmoid(-h)
    if s.loss == "ipo":
        h = (pw / nw - rw / nw) - (pl / nl - rl / nl)
        return (h - 1 / (2 * s.beta)) ** 2
    if s.loss == "simpo":
        h = s.beta * (pw / nw - pl / nl) - s.gamma
        return -(1 - s.label_smoothing) * log_sigmoid(h) - s.label_smoothing * log_sigmoid(-h)

    # orpo: log odds of the per-token probability
    def odds(avg):
        return avg - math.log(1 - math.exp(avg))

    return -pw / nw - s.orpo_lambda * log_sigmoid(odds(pw / nw) - odds(pl / nl))


SETTINGS = [
    Settings("dpo", beta=0.1),
    Settings("dpo", beta=0.5, label_smoothing=0.2),
    Settings("ipo", beta=0.1),
    Settings("simpo", beta=2.0, gamma=0.5),
    Settings("simpo", beta=2.5, gamma=1.0, label_smoothing=0.1),
    Settings("orpo", orpo_lambda=0.1),
    Settings("orpo", orpo_lambda=1.0),
]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"{s.loss}-{s.beta}-{s.label_smoothing}")
def test_each_loss_matches_its_formula_pair_by_pair(s):
    loss, _, _ = pair_losses(s, logps())
    want = [expected(s, *pair) for pair in PAIRS]
    assert loss.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"{s.loss}-{s.beta}-{s.label_smoothing}")
def test_rewards_and_metrics(s):
    lp = logps()
    _, reward_w, reward_l = pair_losses(s, lp)
    if s.loss in ("dpo", "ipo"):
        want_w = [s.beta * (p[0] - p[2]) for p in PAIRS]
        want_l = [s.beta * (p[1] - p[3]) for p in PAIRS]
    else:
        want_w = [s.beta * p[0] / p[4] for p in PAIRS]
        want_l = [s.beta * p[1] / p[5] for p in PAIRS]
    assert reward_w.tolist() == pytest.approx(want_w) and reward_l.tolist() == pytest.approx(want_l)
    sums = metric_sums(lp, reward_w, reward_l).tolist()
    assert sums[0] == pytest.approx(sum(want_w)) and sums[1] == pytest.approx(sum(want_l))
    assert sums[2] == pytest.approx(sum(want_w) - sum(want_l))
    assert sums[3] == sum(w > r for w, r in zip(want_w, want_l, strict=True))
    assert sums[4] == pytest.approx(sum(p[0] for p in PAIRS))
    assert sums[6] == sum(p[0] > p[1] for p in PAIRS)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_the_loss_has_gradients_and_the_rewards_none(name):
    lp = logps()
    chosen = lp.chosen.clone().requires_grad_()
    lp = PairLogps(chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens, lp.ref_chosen,
                   lp.ref_rejected)  # fmt: skip
    loss, reward_w, reward_l = pair_losses(Settings(name), lp)
    loss.sum().backward()
    assert chosen.grad is not None and bool((chosen.grad != 0).all())
    assert not reward_w.requires_grad and not reward_l.requires_grad


def test_a_loss_that_needs_a_reference_refuses_to_run_without_one():
    lp = logps()
    free = PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens)
    with pytest.raises(ValueError, match="reference"):
        pair_losses(Settings("dpo"), free)
    pair_losses(Settings("simpo"), free)  # reference-free


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_target_log_probs_and_gradients_equal_the_plain_ones(chunk):
    from lockstep.training.loss import target_logps

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (7,), generator=g)
    coef = torch.randn(7, generator=g, dtype=torch.float64)
    got = target_logps(hidden, weight, labels, chunk)
    (got * coef).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, labels[:, None]).squeeze(1)
    (plain * coef).sum().backward()
    torch.testing.assert_close(got.double(), plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the module on a real model


def _pair_batch(n_pairs: int = 3):
    """A micro-batch of pairs from the demo data (consecutive samples stand for a pair's two
    answers: the machinery does not look at the text), plus one PAD slot."""
    from conftest import DEMO_DATA

    from lockstep import config
    from lockstep.data.collate import collate
    from lockstep.data.dataset import build
    from lockstep.data.order import PAD
    from lockstep.model.load import load_tokenizer
    from lockstep.training.preference import pair_rows

    cfg = config.validate({"data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64,
                                    "cache": False}, "model": {"path": "builtin:tiny"}})  # fmt: skip
    tok = load_tokenizer(cfg.model)
    samples = build(cfg.data.model_copy(update={"train": cfg.data.train}), tok)
    ids = np.array([*range(n_pairs), PAD])
    return ids, collate(samples, pair_rows(ids), tok.pad_token_id, False, False)


def _model(method: str):
    from lockstep.config import FinetuneConfig, ModelConfig
    from lockstep.model import adapters
    from lockstep.model.load import load_model

    model = load_model(ModelConfig(path="builtin:tiny", attn_implementation="sdpa"), 3)
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    return adapters.apply(FinetuneConfig(method=method, lora=lora), model, 5)


@pytest.mark.parametrize(("method", "reference"), [("lora", "adapters_off"), ("full", "live")])
def test_before_training_the_policy_is_its_reference_dpo_loss_is_log_2(method, reference):
    from lockstep.training.preference import PairPreference

    ids, batch = _pair_batch()
    objective = PairPreference(Settings("dpo"), reference, chunk=16)
    module = objective.module(_model(method))
    out = module(objective.prepare(ids, batch))
    loss, rewards = out[0], out[1:5]
    assert loss.item() == pytest.approx(3 * math.log(2), rel=1e-6)  # 3 real pairs, PAD slot out
    assert rewards.abs().max().item() < 1e-6
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_lora_reference_holds_no_copy_and_live_one_copy():
    from lockstep.training.preference import PairPreference

    def held(module):
        tensors = list(module.parameters()) + [
            p for frozen in module._frozen for p in frozen.parameters()
        ]
        return sum(p.numel() for p in {id(t): t for t in tensors}.values())

    lora = _model("lora")
    own = sum(p.numel() for p in lora.parameters())
    assert held(PairPreference(Settings("dpo"), "adapters_off").module(lora)) == own
    full = _model("full")
    own = sum(p.numel() for p in full.parameters())
    assert held(PairPreference(Settings("dpo"), "live").module(full)) == 2 * own


def test_row_log_probs_chunked_equal_the_plain_path():
    from lockstep.training.preference import PairPreference

    ids, batch = _pair_batch()
    model = _model("full")
    objective = PairPreference(Settings("simpo"), "none", chunk=8)
    prepared = objective.prepare(ids, batch)
    chunked = objective.module(model).row_logps(model, prepared)
    plain = PairPreference(Settings("simpo"), "none", chunk=None).module(model)
    torch.testing.assert_close(chunked, plain.row_logps(model, prepared), rtol=1e-5, atol=1e-4)
    labels = batch["labels"]
    log_probs = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), dim=-1)
    safe = labels.clamp(min=0)
    per_token = log_probs.gather(2, safe[..., None]).squeeze(2) * (labels != -100)
    torch.testing.assert_close(chunked, per_token.sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_precomputed_reference_is_the_starting_models_and_is_read_back(tmp_path, padding_free):
    from conftest import DEMO_DATA

    from lockstep import config
    from lockstep.data.collate import collate
    from lockstep.data.dataset import build
    from lockstep.dist import Dist
    from lockstep.model.attention import Choice
    from lockstep.model.load import load_tokenizer
    from lockstep.training import reference
    from lockstep.training.preference import PairPreference
    from lockstep.training.state import Layout

    cfg = config.validate({
        "data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"path": "builtin:tiny"}, "batch": {"global_size": 4, "micro_size": 4},
    })  # fmt: skip
    tok = load_tokenizer(cfg.model)
    samples = build(cfg.data, tok).subset(list(range(14)))  # 7 pairs: two micro-batches
    objective = PairPreference(Settings("dpo"), "precompute", chunk=16)
    trainee = objective.module(_model("full"))
    path = reference.table_path(cfg, samples, "weights", "sdpa")
    layout = Layout(padding_free, False, Choice("sdpa", "test"))
    args = (cfg, Dist(), trainee, objective, samples, 0, path, layout)
    first, how = reference.precomputed(*args)
    assert how.startswith("computed") and path.is_file()
    again, how = reference.precomputed(*args)
    assert how == f"read from {path}" and np.array_equal(first, again)
    ids = np.array([5, 6])
    batch = objective.prepare(ids, collate(samples, objective.rows(ids), 0, False, False))
    direct = trainee.row_logps(trainee.model, batch)  # rows 10, 12, 11, 13
    np.testing.assert_allclose(first[[10, 12, 11, 13]], direct.detach().numpy(), rtol=1e-5)
    with_table = PairPreference(Settings("dpo"), "precompute", chunk=16, table=first)
    out = trainee(with_table.prepare(ids, collate(samples, with_table.rows(ids), 0, False, False)))
    assert out[0].item() == pytest.approx(2 * math.log(2), rel=1e-5)  # the policy is the start


def test_padding_free_pairs_give_the_padded_rows_log_probs_and_loss():
    """A micro-batch of pairs with a PAD slot, padded (one answer per row) and padding-free (the
    answers end to end, lockstep_segments): the same per-answer log-probabilities, loss and
    metrics; the PAD slot is left out of both halves."""
    from conftest import DEMO_DATA

    from lockstep import config
    from lockstep.data.collate import collate
    from lockstep.data.dataset import build
    from lockstep.data.order import PAD
    from lockstep.model.attention import SEGMENTS
    from lockstep.model.load import load_model, load_tokenizer
    from lockstep.training.preference import ROW_TARGETS, PairPreference

    cfg = config.validate({
        "data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64, "cache": False},
        "model": {"path": "builtin:tiny"},
    })  # fmt: skip
    samples = build(cfg.data, load_tokenizer(cfg.model)).subset(list(range(8)))
    model = load_model(cfg.model.model_copy(update={"attn_implementation": SEGMENTS}), 3)
    objective = PairPreference(Settings("simpo"), "none", chunk=16)
    loss = objective.module(model)
    ids = np.array([2, PAD, 0])
    out = {}
    for free in (False, True):
        batch = objective.prepare(ids, collate(samples, objective.rows(ids), 0, free, free))
        out[free] = (loss.row_logps(model, batch), loss(batch), batch[ROW_TARGETS])
    padded, free = out[False], out[True]
    assert padded[0].shape == (6,) and free[0].shape == (4,)  # the PAD slot's two rows: gone
    keep = [0, 2, 3, 5]  # chosen 2, chosen 0, rejected 2, rejected 0
    torch.testing.assert_close(free[0], padded[0][keep], rtol=1e-5, atol=1e-4)
    assert torch.equal(free[2], padded[2][keep])
    torch.testing.assert_close(free[1], padded[1], rtol=1e-5, atol=1e-4)
    assert free[1][0].item() != 0.0


def test_padding_free_pairs_hand_the_answer_boundaries_to_the_attention_kernel():
    """Each answer's boundaries reach every attention layer through the pair loss: a kernel
    that sees only them (and refuses a batch without them) gives the padded rows' loss."""
    from conftest import DEMO_DATA
    from test_attention import kernel_model, reference_varlen_attention

    from lockstep import config
    from lockstep.data.collate import collate
    from lockstep.data.dataset import build
    from lockstep.model.load import load_model, load_tokenizer
    from lockstep.training.preference import PairPreference

    cfg = config.validate({
        "data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64, "cache": False},
        "model": {"path": "builtin:tiny"},
    })  # fmt: skip
    samples = build(cfg.data, load_tokenizer(cfg.model)).subset(list(range(8)))
    objective = PairPreference(Settings("simpo"), "none", chunk=16)
    ids = np.array([3, 1])
    varlen = kernel_model("lockstep_reference_varlen", reference_varlen_attention)
    sdpa = load_model(cfg.model.model_copy(update={"attn_implementation": "sdpa"}), 1)
    with torch.no_grad():
        got = objective.module(varlen)(
            objective.prepare(ids, collate(samples, objective.rows(ids), 0, True, True))
        )
        want = objective.module(sdpa)(
            objective.prepare(ids, collate(samples, objective.rows(ids), 0, False, False))
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
