"""Token-normalised cross entropy: the one place that defines what "the loss" is.

The loss of an optimizer step is

    L = (sum of per-token cross entropy over every target token of the global batch)
        / (number of target tokens in the global batch, all-reduced over ranks)

Each micro-batch contributes `sum_ce * world_size / global_targets` to backward(): DDP averages
gradients over ranks (divides by world_size), so the accumulated gradient is exactly dL/dθ,
whatever the world size W and accumulation A. A per-micro-batch mean (what many trainers do)
weights a token in a short micro-batch more than one in a long micro-batch, so its gradient
changes with W and A; this one does not, up to floating-point summation order.

The summed cross entropy is computed without the full logits (`train.loss_chunk`): the model
body gives hidden states, only the target positions are kept, and the LM head and the cross
entropy run over chunks of them. The gradients of a chunk are computed as it goes, so no chunk's
logits outlive it: peak memory is chunk x vocab instead of tokens x vocab (in float32), and the
LM head never runs on prompt or padding positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lockstep.data.render import IGNORE
from lockstep.model.adapters import causal_lm

TARGET_INDEX = "target_index"  # batch key: flat positions of the target tokens


class CausalLMLoss(torch.nn.Module):
    """What trains: a causal LM in, the summed cross entropy of a micro-batch out.

    DDP and FSDP wrap this module (not the language model), so their hooks see the whole
    forward pass, the chunked LM head included.
    """

    def __init__(self, model: torch.nn.Module, chunk: int | None = 1024):
        super().__init__()
        self.model = model
        causal = causal_lm(model)
        self.chunked = bool(chunk) and plain_head(causal)
        self.chunk = chunk or 0
        self._causal = [causal]  # a list: not registered twice as a submodule

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", TARGET_INDEX)}
        labels = batch["labels"]
        # use_cache=False also matters for packing: with a cache, transformers skips deriving
        # the block-diagonal mask from restarting position ids (see data/packing.py)
        if not self.chunked:
            logits = self.model(**inputs, use_cache=False).logits.float()
            return F.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE,
                reduction="sum",
            )  # fmt: skip
        causal = self._causal[0]
        hidden = causal.get_decoder()(**inputs, use_cache=False).last_hidden_state
        if TARGET_INDEX in batch:  # found on the host: no device sync to learn their number
            at = batch[TARGET_INDEX]
            hidden = hidden.flatten(0, 1).index_select(0, at)
            labels = labels.flatten().index_select(0, at)
        else:
            keep = labels != IGNORE
            hidden, labels = hidden[keep], labels[keep]
        return chunked_cross_entropy(
            hidden, causal.get_output_embeddings().weight, labels, self.chunk
        )


def with_target_index(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch plus the flat positions that have a target, computed where the labels are (the
    host, before the batch moves to its device): selecting them on the device then needs no
    boolean mask, whose result size the host would have to wait for."""
    flat = batch["labels"].flatten()
    return {**batch, TARGET_INDEX: (flat != IGNORE).nonzero().squeeze(1)}


def plain_head(causal: torch.nn.Module) -> bool:
    """The chunked path needs logits = hidden @ W.T exactly: a bias-free nn.Linear head, a
    decoder to call, and no logit scaling or soft-capping after the head."""
    head = getattr(causal, "get_output_embeddings", lambda: None)()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    try:
        causal.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    text = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else {}
    return not any(
        getattr(text, k, None) not in (None, 1, 1.0)
        for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, labels[i]), never holding more than `chunk` rows of logits."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, dtype, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype, grads):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if grads and hidden.requires_grad else None
            grad_w = None
            if grads and weight.requires_grad:  # the first chunk writes it: no zero-filling
                new = torch.empty_like if hidden.size(0) else torch.zeros_like
                grad_w = new(weight, dtype=torch.float32)
            # one [vocab, hidden] product buffer for every chunk (none needed in float32)
            product = (
                torch.empty_like(weight, dtype=dtype)
                if grad_w is not None and dtype != torch.float32
                else None
            )
            for s in range(0, hidden.size(0), chunk):
                h, y = hidden[s : s + chunk].to(dtype), labels[s : s + chunk]
                logits = (h @ w.T).float()
                target = logits.gather(1, y[:, None]).squeeze(1)
                # log-sum-exp and softmax in place: one [chunk, vocab] buffer, no temporaries
                top = logits.amax(dim=-1, keepdim=True)
                norm = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
                total += (top + norm.log()).squeeze(1).sub(target).sum()
                if not grads:
                    continue
                # d(sum CE)/d(logits) = softmax - one_hot
                p = logits.div_(norm)
                p[torch.arange(len(y), device=y.device), y] -= 1
                p = p.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (p @ w).to(hidden.dtype)
                if product is not None:  # accumulated in float32 without a float32 copy
                    torch.mm(p.T, h, out=product)
                    if s == 0:
                        grad_w.copy_(product)
                    else:
                        grad_w.add_(product)
                elif grad_w is not None and s == 0:
                    torch.mm(p.T, h, out=grad_w)
                elif grad_w is not None:
                    grad_w.addmm_(p.T, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, no second copy
        return (
            None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype)),
            None if grad_w is None else grad_w.mul_(grad_out).to(ctx.weight_dtype),
            None, None, None, None,
        )  # fmt: skip


def backward_scale(world_size: int, global_targets: int) -> float:
    """Factor for a micro-batch's summed loss so that accumulated DDP gradients equal dL/dθ."""
    return world_size / max(global_targets, 1)


def target_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
    """log softmax(hidden[i] @ weight.T)[labels[i]] for every row i, never holding more than
    `chunk` rows of logits: forward keeps no logits, backward computes them again chunk by chunk
    (two more LM-head products than the plain path, for chunk x vocab memory instead of
    rows x vocab). What preference losses need: each target's own log-probability."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _TargetLogps.apply(hidden, weight, labels, max(int(chunk), 1), dtype)


class _TargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.size(0), chunk):
                logits = (hidden[s : s + chunk].to(dtype) @ w.T).float()
                target = logits.gather(1, labels[s : s + chunk, None]).squeeze(1)
                out[s : s + chunk] = target - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            for s in range(0, hidden.size(0), ctx.chunk):
                h, y = hidden[s : s + ctx.chunk].to(ctx.dtype), labels[s : s + ctx.chunk]
                logits = (h @ w.T).float()
                # d(log p_y)/d(logits) = one_hot(y) - softmax, times the incoming gradient
                g = torch.softmax(logits, dim=-1).neg_()
                g[torch.arange(len(y), device=y.device), y] += 1
                g.mul_(grad_out[s : s + ctx.chunk, None].float())
                g = g.to(ctx.dtype)
                if grad_h is not None:
                    grad_h[s : s + ctx.chunk] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.T.float(), h.float())
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None, None, None,
        )  # fmt: skip
