"""Preference losses: the formulas, in one place, on the log-probabilities of answer pairs.

For a pair (prompt x, chosen answer y_w, rejected answer y_l), with log pi(y|x) the sum of the
policy's log-probabilities of the answer's trained tokens, log ref(y|x) the same under the
reference model, and |y| the number of those tokens:

    DPO    h = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))
           loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)      (eps: label_smoothing)
    IPO    h = (avg pi(y_w) - avg ref(y_w)) - (avg pi(y_l) - avg ref(y_l))
           loss = (h - 1 / (2 * beta))^2                 (avg: log-probability per token, log/|y|)
    SimPO  h = beta * (avg pi(y_w) - avg pi(y_l)) - gamma                   (no reference model)
           loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    ORPO   odds(y) = avg pi(y) - log(1 - exp(avg pi(y)))                    (no reference model)
           loss = -avg pi(y_w) - lambda * log sigmoid(odds(y_w) - odds(y_l))

The loss of a step is the mean of the pairs' losses over the whole global batch: each rank sums
its pairs' losses and the loop divides by the number of pairs in the global batch
(training/objective.py), so it does not depend on the number of processes or the accumulation.

Rewards, for the logs: beta * (log pi - log ref) with a reference (DPO, IPO), beta * avg pi
without one (SimPO, ORPO); the margin is chosen minus rejected; the accuracy is the share of
pairs whose chosen reward is the larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
    "logps/chosen", "logps/rejected",
)  # fmt: skip


@dataclass(frozen=True)
class PairLogps:
    """Per pair: the summed log-probabilities of each answer's trained tokens under the policy
    (and the reference, None for reference-free losses), and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass(frozen=True)
class Settings:
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5  # SimPO's target margin
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term


def pair_losses(s: Settings, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair, for `s.loss` (see the module docstring)."""
    avg_w = lp.chosen / lp.chosen_tokens.clamp(min=1)
    avg_l = lp.rejected / lp.rejected_tokens.clamp(min=1)
    if s.loss in REFERENCE_FREE:
        reward_w, reward_l = s.beta * avg_w.detach(), s.beta * avg_l.detach()
        if s.loss == "simpo":
            return (
                _smoothed(s.beta * (avg_w - avg_l) - s.gamma, s.label_smoothing),
                reward_w,
                reward_l,
            )
        odds = (avg_w - torch.log1p(-torch.exp(avg_w))) - (avg_l - torch.log1p(-torch.exp(avg_l)))
        return -avg_w - s.orpo_lambda * F.logsigmoid(odds), reward_w, reward_l
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError(f"preference.loss={s.loss} needs the reference model's log-probabilities")
    ratio_w, ratio_l = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected
    reward_w, reward_l = s.beta * ratio_w.detach(), s.beta * ratio_l.detach()
    if s.loss == "dpo":
        return _smoothed(s.beta * (ratio_w - ratio_l), s.label_smoothing), reward_w, reward_l
    if s.loss == "ipo":
        ref_w = lp.ref_chosen / lp.chosen_tokens.clamp(min=1)
        ref_l = lp.ref_rejected / lp.rejected_tokens.clamp(min=1)
        h = (avg_w - ref_w) - (avg_l - ref_l)
        return (h - 1 / (2 * s.beta)) ** 2, reward_w, reward_l
    raise ValueError(f"unknown preference loss {s.loss!r}; one of {', '.join(LOSSES)}")


def _smoothed(h: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def metric_sums(lp: PairLogps, reward_w: torch.Tensor, reward_l: torch.Tensor) -> torch.Tensor:
    """The sums over the pairs of each of METRICS (the loop divides them by the pairs)."""
    return torch.stack([
        reward_w.sum(), reward_l.sum(), (reward_w - reward_l).sum(),
        (reward_w > reward_l).to(reward_w.dtype).sum(),
        lp.chosen.detach().sum(), lp.rejected.detach().sum(),
    ])  # fmt: skip
