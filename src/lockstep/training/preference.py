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
pairs whose chosen reward is the larger; prefers_chosen, the share of pairs whose chosen answer
the policy itself finds likelier (log pi(y_w) > log pi(y_l), no reference involved).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.data.render import IGNORE
from lockstep.model.adapters import causal_lm
from lockstep.model.attention import VARLEN_KEYS
from lockstep.training.loss import TARGET_INDEX, plain_head, target_logps

LOSSES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
    "logps/chosen", "logps/rejected", "prefers_chosen",
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
        (lp.chosen > lp.rejected).to(reward_w.dtype).sum(),
    ])  # fmt: skip


# ---------------------------------------------------------------- the objective

TARGET_ROW = "target_row"  # batch key: the row of each target position (TARGET_INDEX's order)
ROW_TARGETS = "row_targets"  # batch key: the number of targets of each row
REAL_PAIRS = "real_pairs"  # batch key: the pairs of the micro-batch that are not PAD slots
REF_LOGPS = "ref_logps"  # batch key: each row's precomputed reference log-probability
REFERENCE_PASS = "reference_pass"  # batch key: return each row's log-probability, no loss


def pair_rows(ids: np.ndarray) -> np.ndarray:
    """The rows of pairs `ids` in a pairs' Samples (row 2i: pair i's chosen answer, 2i+1: its
    rejected one), as a micro-batch lays them: every chosen row, then every rejected row. A PAD
    slot stays PAD in both halves."""
    ids = np.asarray(ids, dtype=np.int64)
    chosen = np.where(ids == PAD, PAD, 2 * ids)
    return np.concatenate([chosen, np.where(ids == PAD, PAD, 2 * ids + 1)])


@dataclass(frozen=True)
class PairPreference:
    """finetune.stage=preference: the mean over the global batch's pairs of their preference
    loss (see the module docstring). `reference`: none | adapters_off | live | precompute;
    `table`: with precompute, every row's reference log-probability (training/reference.py)."""

    settings: Settings
    reference: str
    chunk: int | None = 1024
    name: str = "preference"
    metrics: tuple[str, ...] = METRICS
    table: np.ndarray | None = field(default=None, compare=False, repr=False)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return PairLoss(model, self.settings, self.reference, self.chunk)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return pair_rows(ids)

    def units(self, samples: Samples) -> int:
        return len(samples) // 2

    def unit_lengths(self, samples: Samples) -> np.ndarray:
        """Each pair's two rows together (a trailing half pair, which no pair holds, is left
        out, as `units` leaves it)."""
        lengths, rows = samples.lengths(), 2 * self.units(samples)
        return lengths[0:rows:2] + lengths[1:rows:2]

    def denominator(self, samples: Samples, ids: np.ndarray) -> int:
        return int((np.asarray(ids) != PAD).sum())

    def prepare(self, ids: np.ndarray, batch: dict) -> dict:
        """Host side: the flat target positions, the answer (row) of each, each answer's target
        count, the pairs that hold answers and, when precomputed, the answers' reference
        log-probabilities. Padded rows: one answer per row, a PAD slot a row without targets.
        Padding-free rows (position ids restarting at each answer): the answers end to end,
        PAD slots left out of both halves (data/collate.py)."""
        labels = batch["labels"]
        at = (labels.flatten() != IGNORE).nonzero().squeeze(1)
        rows = self.rows(ids)
        if "position_ids" in batch:
            answer = torch.cumsum(batch["position_ids"].flatten() == 0, 0) - 1
            count, of_target = int(answer[-1]) + 1, answer.index_select(0, at)
            rows = rows[rows != PAD]
        else:
            count, of_target = labels.size(0), at // labels.size(1)
        per_row = torch.bincount(of_target, minlength=count)
        m = count // 2
        real = ((per_row[:m] > 0) & (per_row[m : 2 * m] > 0)).nonzero().squeeze(1)
        out = {
            **batch, TARGET_INDEX: at, TARGET_ROW: of_target, ROW_TARGETS: per_row,
            REAL_PAIRS: real,
        }  # fmt: skip
        if self.table is not None:
            out[REF_LOGPS] = torch.from_numpy(np.where(rows == PAD, 0.0, self.table[rows]))
        return out


def reference_of(cfg) -> str:
    """preference.reference resolved: none for reference-free losses; auto: adapters_off with
    LoRA, precompute otherwise (and with finetune.lora.init_from, whose starting model is the
    base with that adapter, not the base alone)."""
    pref = cfg.preference
    if pref.loss in REFERENCE_FREE:
        return "none"
    if pref.reference != "auto":
        return pref.reference
    fresh_lora = cfg.finetune.method == "lora" and not cfg.finetune.lora.init_from
    return "adapters_off" if fresh_lora else "precompute"


class PairLoss(torch.nn.Module):
    """What trains in preference training: a micro-batch of pairs (2m answers: the m chosen
    ones, then the m rejected ones, one per row or end to end in one row) in; the sum of its pairs' losses, then the sums of
    METRICS, out (a vector). DDP and FSDP wrap this module."""

    def __init__(self, model: torch.nn.Module, settings: Settings, reference: str, chunk):
        super().__init__()
        self.model = model
        self.settings, self.reference = settings, reference
        causal = causal_lm(model)
        self.chunk = chunk or 0
        self.chunked = bool(chunk) and plain_head(causal)
        self._causal = [causal]  # lists: not registered as submodules (no second state dict)
        self._frozen: list[torch.nn.Module] = []
        if reference == "live":
            frozen = copy.deepcopy(model).eval()
            frozen.requires_grad_(False)
            self._frozen.append(frozen)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if REFERENCE_PASS in batch:  # training/reference.py: the starting model's log-probs
            with torch.no_grad():
                return self.row_logps(self.model, batch)
        logps = self.row_logps(self.model, batch)
        ref = self.reference_logps(batch)
        m = logps.size(0) // 2
        real = batch[REAL_PAIRS]
        counts = batch[ROW_TARGETS].to(logps.dtype)

        def pick(x, half):
            return None if x is None else x[half * m : (half + 1) * m].index_select(0, real)

        lp = PairLogps(
            chosen=pick(logps, 0), rejected=pick(logps, 1), chosen_tokens=pick(counts, 0),
            rejected_tokens=pick(counts, 1), ref_chosen=pick(ref, 0), ref_rejected=pick(ref, 1),
        )  # fmt: skip
        losses, reward_w, reward_l = pair_losses(self.settings, lp)
        return torch.cat([losses.sum().reshape(1), metric_sums(lp, reward_w, reward_l)])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The reference model's summed log-probability of each row (None: reference-free)."""
        if self.reference == "none":
            return None
        if REF_LOGPS in batch:
            return batch[REF_LOGPS].float()
        if self.reference == "precompute":
            raise ValueError("preference.reference=precompute, but the batch holds no table")
        with torch.no_grad():
            if self.reference == "live":
                return self.row_logps(self._frozen[0], batch)
            was = self.model.training
            self.model.eval()  # the reference has no dropout
            try:
                with self.model.disable_adapter():
                    return self.row_logps(self.model, batch)
            finally:
                self.model.train(was)

    def row_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's summed log-probability of its target tokens under `model` (float32)."""
        keep = ("input_ids", "attention_mask", "position_ids", *VARLEN_KEYS)
        inputs = {k: batch[k] for k in keep if k in batch}
        labels, at = batch["labels"], batch[TARGET_INDEX]
        y = labels.flatten().index_select(0, at)
        causal = causal_lm(model)
        if self.chunked:
            hidden = causal.get_decoder()(**inputs, use_cache=False).last_hidden_state
            h = hidden.flatten(0, 1).index_select(0, at)
            logps = target_logps(h, causal.get_output_embeddings().weight, y, self.chunk)
        else:
            logits = model(**inputs, use_cache=False).logits.float().flatten(0, 1)
            logps = torch.log_softmax(logits.index_select(0, at), dim=-1)
            logps = logps.gather(1, y[:, None]).squeeze(1)
        sums = torch.zeros(batch[ROW_TARGETS].numel(), dtype=torch.float32, device=logps.device)
        return sums.index_add(0, batch[TARGET_ROW], logps.float())
