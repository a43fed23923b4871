"""Preference losses against straightforward per-pair arithmetic (the math module, one pair at a
time), on fixed log-probabilities."""

from __future__ import annotations

import math

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
