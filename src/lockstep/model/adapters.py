"""Which parameters train: all of them (full), LoRA adapters (PEFT), or chosen blocks (freeze)."""

from __future__ import annotations

import fnmatch

import torch

from lockstep.config import FinetuneConfig
from lockstep.errors import ConfigError, ModelError
from lockstep.model.load import quiet_peft_wrap


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
    targets = lora_target_parameters(cfg, model)
    if s.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    # target_parameters only when asked: PEFT before 0.17 does not know the argument
    extra = {"target_parameters": targets} if targets else {}
    try:
        peft_cfg = LoraConfig(
            r=s.r,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=s.target_modules,
            use_rslora=s.use_rslora,
            use_dora=s.use_dora,
            task_type="CAUSAL_LM",
            **extra,
        )
    except TypeError as e:
        raise ConfigError(
            f"finetune.lora.target_parameters needs peft >= 0.17 (pip install -U peft): {e}"
        ) from None
    # adapter initialisation must be the same on every rank, and must not touch global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            with quiet_peft_wrap():
                return get_peft_model(model, peft_cfg)
        except ValueError as e:
            raise ConfigError(f"finetune.lora: {e}") from None


def lora_target_parameters(cfg: FinetuneConfig, model: torch.nn.Module) -> list[str]:
    """finetune.lora.target_parameters resolved against the model: each name must match a
    parameter (PEFT's rule: the full name or a dotted suffix of it); `experts` stands for every
    3-D parameter of the blocks (the fused experts of a mixture-of-experts model)."""
    asked = cfg.lora.target_parameters
    if not asked:
        return []
    s = cfg.lora
    for field, bad in (("dropout", s.dropout > 0), ("use_dora", s.use_dora)):
        if bad:
            raise ConfigError(
                f"finetune.lora.target_parameters: PEFT cannot combine LoRA on parameters with "
                f"finetune.lora.{field}={getattr(s, field)}; set finetune.lora.{field} to "
                f"{0.0 if field == 'dropout' else False}"
            )
    names = [n for n, _ in model.named_parameters()]
    kind = type(model).__name__
    if asked == "experts":
        prefix, _ = find_blocks(model)
        found = sorted({_within_block(n, prefix) for n in names if _is_3d(model, n, prefix)})
        if not found:
            raise ConfigError(
                f"finetune.lora.target_parameters=experts, but {kind} has no expert weights "
                "(3-D parameters in its blocks); it is not a mixture-of-experts model: drop "
                "finetune.lora.target_parameters"
            )
        return found
    for target in asked:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            threed = [n for n in names if _is_3d(model, n)]
            like = f"; its expert weights are named like {threed[0]!r}" if threed else ""
            raise ConfigError(
                f"finetune.lora.target_parameters: {target!r} matches no parameter of {kind} "
                f"(give a parameter name or its end, e.g. 'experts.down_proj'){like}"
            )
    return list(asked)


def _is_3d(model: torch.nn.Module, name: str, prefix: str | None = None) -> bool:
    p = model.get_parameter(name)
    return p.ndim == 3 and (prefix is None or name.startswith(f"{prefix}."))


def _within_block(name: str, prefix: str) -> str:
    """'model.layers.3.mlp.experts.down_proj' -> 'mlp.experts.down_proj' (prefix model.layers)."""
    return name[len(prefix) + 1 :].split(".", 1)[-1]


def freeze(cfg: FinetuneConfig, model: torch.nn.Module) -> None:
    """requires_grad=False everywhere except the last N blocks or the matching parameters."""
    fz = cfg.freeze
    names = [n for n, _ in model.named_parameters()]
    if fz.trainable_layers is not None:
        prefix, layers = find_blocks(model)
        if fz.trainable_layers > len(layers):
            raise ConfigError(
                f"finetune.freeze.trainable_layers={fz.trainable_layers}, but the model has "
                f"{len(layers)} blocks"
            )
        keep = tuple(
            f"{prefix}.{i}." for i in range(len(layers) - fz.trainable_layers, len(layers))
        )
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


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if is_peft(model) else model


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(its module name in `model`, the transformer blocks): what freeze counts, FSDP shards and
    torch.compile compiles one by one.

    The blocks are the ModuleList whose items are all of a class the model names in
    `_no_split_modules` (the classes transformers keeps whole when it splits a model over
    devices): `model.layers` (Llama, Qwen, ...), `gpt_neox.layers`, `transformer.h` (GPT-2,
    GPTBigCode, Falcon) alike. A model that names none (remote code): the ModuleList of one
    repeated class. Of several candidates, the one holding the most parameters (the language
    model's, not a vision tower's).
    """
    kinds = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    lists = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m)
    ]  # fmt: skip
    named = [(n, m) for n, m in lists if all(_of_kind(b, kinds) for b in m)] if kinds else []
    found = named or [(n, m) for n, m in lists if len({type(b) for b in m}) == 1]
    if not found:
        raise ModelError(
            f"{type(causal_lm(model)).__name__}: cannot find its transformer blocks (a ModuleList "
            f"of the classes in _no_split_modules {sorted(kinds)}, or of one repeated class); "
            "finetune.freeze.trainable_layers, train.strategy=fsdp and train.compile need them"
        )
    return max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _of_kind(block: torch.nn.Module, kinds: set[str]) -> bool:
    """The block's class or one it derives from (FSDP2 subclasses it) is named in `kinds`."""
    return any(c.__name__ in kinds for c in type(block).__mro__)


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (see find_blocks)."""
    return find_blocks(model)[1]


def describe(cfg: FinetuneConfig, model: torch.nn.Module) -> str:
    """One start-up line: what trains (which modules LoRA wraps, which blocks freeze keeps) and
    how many parameters that is."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    counts = f"{trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.2%})"
    if cfg.method == "lora":
        return f"LoRA r={cfg.lora.r} on {lora_targets(model)}; {counts}"
    if cfg.method == "freeze" and cfg.freeze.trainable_layers is not None:
        prefix, layers = find_blocks(model)
        first, last = len(layers) - cfg.freeze.trainable_layers, len(layers) - 1
        span = f"{prefix}.{first}" + (f"-{last}" if last > first else "")
        return (
            f"freeze: the last {cfg.freeze.trainable_layers} of {len(layers)} blocks train "
            f"({span}); {counts}"
        )
    if cfg.method == "freeze":
        return f"freeze: parameters matching {cfg.freeze.trainable_modules} train; {counts}"
    return f"full: {counts}"


def lora_targets(model: torch.nn.Module) -> str:
    """What LoRA wraps, by kind and how many blocks: 'q_proj, v_proj x 2 layers;
    experts.gate_up_proj x 2 layers' (a wrapped parameter is named with its module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        prefix, layers = find_blocks(model)
        count = len(layers)
    except ModelError:  # blocks unknown: every wrapped module by its full name
        prefix, count = None, 0
    where: dict[str, set[int]] = {}  # kind -> block indices, in the order met
    params = set()  # the kinds that are parameters (LoRA on a parameter, e.g. 3-D experts)
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        name = name.replace(".base_layer", "")  # a nested wrapper (several parameters)
        param = getattr(module, "parameter_name", None)
        if param:
            name = f"{name}.{param}"
        index, _, inner = name.removeprefix(f"{prefix}.").partition(".")
        in_block = prefix is not None and name.startswith(f"{prefix}.") and index.isdigit()
        kind = inner if in_block else name  # outside the blocks: e.g. the output head
        indices = where.setdefault(kind, set())
        if in_block:
            indices.add(int(index))
        if param:
            params.add(kind)
    if not where:
        return "nothing"
    short = _short_names(list(where), params)
    groups: dict[frozenset[int], list[str]] = {}
    for kind, indices in where.items():
        groups.setdefault(frozenset(indices), []).append(short[kind])
    parts = []
    for indices, kinds in groups.items():
        n = len(indices)
        span = f" x {n} layers" if n == count else f" x {n} of {count} layers"
        parts.append(", ".join(kinds) + (span if n else ""))
    return "; ".join(parts)


def _short_names(kinds: list[str], params: set[str]) -> dict[str, str]:
    """The shortest dotted ending of each kind that no other kind shares ('self_attn.q_proj' ->
    'q_proj'; GPT-2's two c_proj stay 'attn.c_proj', 'mlp.c_proj'); a parameter keeps its
    module's name ('experts.down_proj')."""
    out = {}
    for kind in kinds:
        parts = kind.split(".")
        for n in range(2 if kind in params else 1, len(parts) + 1):
            end = ".".join(parts[-n:])
            if not any(o != kind and (o == end or o.endswith(f".{end}")) for o in kinds):
                break
        out[kind] = ".".join(parts[-n:])
    return out
