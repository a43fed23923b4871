"""The end of a run: the final model in OUTPUT/final (a Hugging Face folder), and what the
user sees of it (the eval.show table of answers before and after training)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lockstep.config import RunConfig
from lockstep.dist import Dist, derive_seed
from lockstep.model import adapters
from lockstep.model.load import load_model, quiet_bars, resolve
from lockstep.report import compare
from lockstep.training import parallel, sharded


def final_state(cfg: RunConfig, d: Dist, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """With FSDP, the weights final/ needs, gathered from every rank's shards onto rank 0's CPU
    (a collective): a LoRA adapter only (its frozen base is never gathered), every weight for a
    full or freeze run. None without FSDP: the model itself holds them."""
    if not parallel.shards_weights(cfg, d):
        return None
    return sharded.full_state(model, trainable_only=adapters.is_peft(model))


def save_final(
    model: torch.nn.Module, tokenizer, out: Path, cfg: RunConfig, state: dict | None = None
) -> Path:
    """A Hugging Face folder, written aside and renamed into place so it is never half there.

    A LoRA run's final/ is a PEFT adapter (PeftModel.from_pretrained opens it). Its base is
    model.path; for a built-in model, whose weights were initialised from the seed, the base is
    saved next to it in OUTPUT/base/ so the adapter can be loaded anywhere.
    """
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters.is_peft(model):
        base = _base_for_adapter(cfg, out, tokenizer)
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base
    # state: the full weights gathered from FSDP shards (the model itself holds only a shard)
    with quiet_bars():
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _base_for_adapter(cfg: RunConfig, out: Path, tokenizer) -> str:
    where, fresh = resolve(cfg.model.path)
    if not fresh:
        return str(Path(where).resolve()) if Path(where).exists() else where
    base = out / "base"
    with quiet_bars():
        load_model(cfg.model, derive_seed(cfg.seed, "init")).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return str(base.resolve())


SHOWN = 12  # rows of the before/after table a preference run prints (it counts them all)


def before_after(cfg: RunConfig, trained: torch.nn.Module, tokenizer, eval_samples) -> str:
    """The eval.show table: the first eval prompts answered by the model the run started from
    (built again from the seed, or loaded) and by `trained`. Preference runs: the eval pairs'
    prompts, the data's answer being the chosen one; the table shows its first SHOWN rows."""
    device = next(trained.parameters()).device
    start = load_model(cfg.model, derive_seed(cfg.seed, "init")).to(device)
    shown = None
    if cfg.finetune.stage == "preference":  # rows 2i: prompt + chosen answer
        eval_samples = eval_samples.subset(list(range(0, len(eval_samples), 2)))
        shown = SHOWN
    rows = compare.table(start, trained, tokenizer, eval_samples, cfg.eval.show)
    table = compare.render(rows, shown)
    return f"what training changed, on the first {len(rows)} eval prompts:\n{table}"


def preference_change(rows: list[dict]) -> str:
    """What preference training changed on the eval pairs, from the run's metrics rows: how
    often the model finds the chosen answer likelier, before the first step and at the end."""
    evals = [r for r in rows if "eval_prefers_chosen" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        return "eval pairs: no row from before the first step to compare with"
    start, end = evals[0], evals[-1]
    return (
        f"eval pairs whose chosen answer the model finds likelier: "
        f"{start['eval_prefers_chosen']:.1%} before training, {end['eval_prefers_chosen']:.1%} "
        f"after {end['step']} steps (reward accuracy {end['eval_rewards/accuracy']:.1%}, "
        f"margin {end['eval_rewards/margin']:.3f}, over {end['eval_units']} pairs)"
    )


def load_final(final: Path) -> torch.nn.Module:
    """The trained model from its final/ folder (a full model, or an adapter on its base)."""
    from lockstep import infer

    return infer.load(str(final)).model
