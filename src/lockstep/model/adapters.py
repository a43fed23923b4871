"""Which parameters train: all of them (full), LoRA adapters (PEFT), or chosen blocks (freeze)."""

from __future__ import annotations

import fnmatch

import torch

from lockstep.config import FinetuneConfig
from lockstep.errors import ConfigError, ModelError


def check_supported(cfg: FinetuneConfig) -> None:
    """Fail before any work on a method this machine cannot run."""
    if cfg.method == "lora" and cfg.lora.quantize and not torch.cuda.is_available():
        raise ConfigError(
            f"finetune.lora.quantize={cfg.lora.quantize} (QLoRA) needs a CUDA GPU and "
            "bitsandbytes; none is available here. Set finetune.lora.quantize=null for LoRA on "
            "full-precision weights."
        )


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def apply(cfg: FinetuneConfig, model: torch.nn.Module, init_seed: int) -> torch.nn.Module:
    if cfg.method == "lora":
        return lora(cfg, model, init_seed)
    if cfg.method == "freeze":
        freeze(cfg, model)
    return model


def lora(cfg: FinetuneConfig, model: torch.nn.Module, init_seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    s = cfg.lora
    if s.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    peft_cfg = LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.target_modules,
        use_rslora=s.use_rslora,
        use_dora=s.use_dora,
        task_type="CAUSAL_LM",
    )
    # adapter initialisation must be the same on every rank, and must not touch global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as e:
            raise ConfigError(f"finetune.lora: {e}") from None


def freeze(cfg: FinetuneConfig, model: torch.nn.Module) -> None:
    """requires_grad=False everywhere except the last N blocks or the matching parameters."""
    fz = cfg.freeze
    names = [n for n, _ in model.named_parameters()]
    if fz.trainable_layers is not None:
        blocks = _block_prefixes(model)
        if fz.trainable_layers > len(blocks):
            raise ConfigError(
                f"finetune.freeze.trainable_layers={fz.trainable_layers}, but the model has "
                f"{len(blocks)} blocks"
            )
        keep = tuple(blocks[-fz.trainable_layers :])
        trainable = {n for n in names if n.startswith(keep)}
    else:
        trainable = {n for n in names if any(fnmatch.fnmatch(n, p) for p in fz.trainable_modules)}
        if not trainable:
            raise ConfigError(
                f"finetune.freeze.trainable_modules {fz.trainable_modules} match no parameter; "
                f"names look like {names[0]!r}, {names[len(names) // 2]!r}"
            )
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)


def _block_prefixes(model: torch.nn.Module) -> list[str]:
    """Parameter-name prefixes of the transformer blocks, in order ('model.layers.0.', ...)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and name.endswith("layers"):
            return [f"{name}.{i}." for i in range(len(module))]
    raise ModelError("cannot find the transformer blocks (a ModuleList named *layers)")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if is_peft(model) else model


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (what FSDP shards and torch.compile compiles one by one)."""
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"{type(causal_lm(model)).__name__}: cannot find its transformer blocks "
            "(decoder.layers); train.compile and train.strategy=fsdp need them"
        )
    return layers
