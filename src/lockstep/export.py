"""Turn a run or any of its checkpoints into a standalone Hugging Face folder.

Full and freeze runs are written as trained; a LoRA run's adapter is merged into its base.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lockstep import config as config_mod
from lockstep.data import templates
from lockstep.dist import derive_seed
from lockstep.errors import CheckpointError, LockstepError, first_line
from lockstep.model import adapters
from lockstep.model.load import DTYPES, load_model, load_tokenizer, quiet_bars
from lockstep.training import checkpoint


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    if (path / checkpoint.COMPLETE).is_file():
        return path
    found = checkpoint.complete_checkpoints(path / "checkpoints")
    if found:
        return found[-1]
    why = "does not exist" if not path.exists() else "is neither a complete checkpoint nor a run"
    raise CheckpointError(f"{path} {why} (a run folder holds checkpoints/step-*/COMPLETE)")


def checkpoint_config(ckpt: Path, trust_remote_code: bool = False) -> config_mod.RunConfig:
    """The run config a checkpoint saved, to rebuild its model from.

    A checkpoint is data: its own config.yaml never turns remote code on. One trained with
    model.trust_remote_code=true (its model folder's Python runs as the model loads) is refused
    unless the user passes --trust-remote-code (`trust_remote_code`).
    """
    cfg = config_mod.validate(checkpoint.read(ckpt).config)
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with model.trust_remote_code=true: loading its model "
            f"runs the Python code of {cfg.model.path}. Pass --trust-remote-code if you trust it"
        )
    return cfg


def model_from_checkpoint(
    ckpt: Path, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, config_mod.RunConfig, int]:
    """The model as it was at a checkpoint, its run config, and the number of tensors loaded.
    `trust_remote_code`: the user's --trust-remote-code (see checkpoint_config)."""
    cfg = checkpoint_config(ckpt, trust_remote_code)
    model = load_model(cfg.model, derive_seed(cfg.seed, "init"))
    model = adapters.apply(cfg.finetune, model, derive_seed(cfg.seed, "adapter"))
    return model, cfg, checkpoint.load_trained(ckpt, model)


def tokenizer_from_checkpoint(ckpt: Path, cfg: config_mod.RunConfig):
    """The tokenizer a checkpoint saved (with the chat template the run trained with); one
    written before checkpoints held a tokenizer is rebuilt from the run's config. Remote code
    only as `cfg` (from checkpoint_config) allows."""
    saved = ckpt / "tokenizer"
    if not (saved / "tokenizer_config.json").is_file():
        return load_tokenizer(cfg.model, templates.configured(cfg.data))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(saved, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # a damaged folder: transformers raises several types
        raise CheckpointError(
            f"cannot load the tokenizer saved in {saved}: {first_line(e)}"
        ) from None


def check_out(out: Path, overwrite: bool) -> bool:
    """Whether `out` holds something export would replace; refused unless `overwrite` (the
    user's --overwrite), checked before any model loads."""
    if out.exists() and not out.is_dir():
        raise LockstepError(f"--out {out} is a file; give a folder to write the model to")
    taken = out.is_dir() and any(out.iterdir())
    if taken and not overwrite:
        raise LockstepError(
            f"--out {out} already holds files; choose another folder, or add --overwrite to "
            "replace what is in it"
        )
    return taken


def export(
    source: Path, out: Path, dtype: str | None = None, trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write checkpoint (or run) `source` as a Hugging Face folder `out`; remote code runs only
    with `trust_remote_code` (the user's --trust-remote-code). A folder `out` that holds files
    is refused unless `overwrite`; then it is emptied first, so no file of the old model stays."""
    taken = check_out(out, overwrite)
    ckpt = resolve_checkpoint(source)
    model, cfg, n_tensors = model_from_checkpoint(ckpt, trust_remote_code)
    if adapters.is_peft(model):  # LoRA: fold the adapter into the base weights
        model = model.merge_and_unload()
    if dtype:
        model = model.to(DTYPES[dtype])
    tokenizer = tokenizer_from_checkpoint(ckpt, cfg)
    if taken:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_bars():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"exported {ckpt} ({n_tensors} tensors) to {out}" + (" (replaced)" if taken else ""))
    return out
