"""Turn a run or any of its checkpoints into a standalone Hugging Face folder.

Full and freeze runs are written as trained; a LoRA run's adapter is merged into its base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lockstep import config as config_mod
from lockstep.data import templates
from lockstep.dist import derive_seed
from lockstep.errors import CheckpointError, first_line
from lockstep.model import adapters
from lockstep.model.load import DTYPES, load_model, load_tokenizer
from lockstep.training import checkpoint, sharded


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    if (path / checkpoint.COMPLETE).is_file():
        return path
    found = checkpoint.complete_checkpoints(path / "checkpoints")
    if found:
        return found[-1]
    why = "does not exist" if not path.exists() else "is neither a complete checkpoint nor a run"
    raise CheckpointError(f"{path} {why} (a run folder holds checkpoints/step-*/COMPLETE)")


def model_from_checkpoint(ckpt: Path) -> tuple[torch.nn.Module, config_mod.RunConfig, int]:
    """The model as it was at a checkpoint, its run config, and the number of tensors loaded."""
    cfg = config_mod.validate(checkpoint.read(ckpt).config)
    model = load_model(cfg.model, derive_seed(cfg.seed, "init"))
    model = adapters.apply(cfg.finetune, model, derive_seed(cfg.seed, "adapter"))
    if sharded.is_sharded(ckpt):
        return model, cfg, sharded.load_weights(ckpt, model)
    return model, cfg, len(checkpoint.load_weights(ckpt, model))


def tokenizer_from_checkpoint(ckpt: Path, cfg: config_mod.RunConfig):
    """The tokenizer a checkpoint saved (with the chat template the run trained with); one
    written before checkpoints held a tokenizer is rebuilt from the run's config."""
    saved = ckpt / "tokenizer"
    if not (saved / "tokenizer_config.json").is_file():
        return load_tokenizer(cfg.model, templates.configured(cfg.data))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(saved, trust_remote_code=False)
    except Exception as e:  # a damaged folder: transformers raises several types
        raise CheckpointError(
            f"cannot load the tokenizer saved in {saved}: {first_line(e)}"
        ) from None


def export(source: Path, out: Path, dtype: str | None = None) -> Path:
    ckpt = resolve_checkpoint(source)
    model, cfg, n_tensors = model_from_checkpoint(ckpt)
    if adapters.is_peft(model):  # LoRA: fold the adapter into the base weights
        model = model.merge_and_unload()
    if dtype:
        model = model.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_from_checkpoint(ckpt, cfg).save_pretrained(out)
    print(f"exported {ckpt} ({n_tensors} tensors) to {out}")
    return out
