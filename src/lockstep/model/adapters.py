"""Which parameters train: all of them (full), LoRA adapters (PEFT), or chosen blocks (freeze).

finetune.lora.init_from: LoRA starts from an existing PEFT adapter. The adapter decides the
settings that shape it (INIT_FROM_DECIDES; resolve_init_from fills them in, and refuses a config
that sets one to another value), a new run loads its weights (load_init_from), and a resumed
run restores its checkpoint instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lockstep.config import FinetuneConfig, RunConfig
from lockstep.errors import ConfigError, ModelError, first_line
from lockstep.model.load import quiet_peft_wrap

# finetune.lora's settings an init_from adapter decides, by the adapter_config.json key
INIT_FROM_DECIDES = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "target_parameters": "target_parameters",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}
# adapter_config.json keys lockstep cannot reproduce when they hold anything
INIT_FROM_UNSUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# of those, what the config may set otherwise: a training setting, not part of the adapter's
# function (it takes the adapter's value when the config does not set it)
INIT_FROM_DEFAULTS_ONLY = ("dropout",)


def check_supported(cfg: FinetuneConfig) -> None:
    """Fail before any work on a method this machine cannot run."""
    if cfg.method == "lora" and cfg.lora.quantize and not torch.cuda.is_available():
        raise ConfigError(
            f"finetune.lora.quantize={cfg.lora.quantize} (QLoRA) needs a CUDA GPU and "
            "bitsandbytes; none is available here. Set finetune.lora.quantize=null for LoRA on "
            "full-precision weights."
        )


def adapter_files(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """(adapter_config.json as a dict, the weights file) of the PEFT adapter `folder`
    (finetune.lora.init_from); a missing or unreadable one is a ConfigError naming it."""
    where = Path(folder).expanduser()
    field = "finetune.lora.init_from"
    if not (where / "adapter_config.json").is_file():
        why = "does not exist" if not where.exists() else "has no adapter_config.json"
        raise ConfigError(
            f"{field}: {str(where)!r} {why}; give a PEFT adapter folder (a LoRA run's "
            "OUTPUT/final, or any save_pretrained of a PEFT model)"
        )
    try:
        raw = json.loads((where / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {where}/adapter_config.json is not readable JSON: "
                          f"{first_line(e)}") from None  # fmt: skip
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{field}: {where} is a {kind} adapter, not LoRA")
    weights = [where / name for name in ADAPTER_WEIGHTS if (where / name).is_file()]
    if not weights:
        raise ConfigError(
            f"{field}: {where} has adapter_config.json but no weights "
            f"({' or '.join(ADAPTER_WEIGHTS)})"
        )
    return raw, weights[0]


def init_from_settings(raw: dict[str, Any], folder: str) -> dict[str, Any]:
    """finetune.lora's INIT_FROM_DECIDES settings as the adapter_config.json `raw` holds them
    (target_modules as a sorted list of names); what lockstep cannot reproduce is refused."""
    field = "finetune.lora.init_from"
    for key in INIT_FROM_UNSUPPORTED:
        if raw.get(key):
            raise ConfigError(
                f"{field}: the adapter {folder} sets {key}={raw[key]!r}, which finetune.lora "
                "cannot reproduce; continue from an adapter without it"
            )
    targets = raw.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ConfigError(
            f"{field}: the adapter {folder} chooses its modules by the pattern {targets!r}; "
            "finetune.lora.target_modules takes module names or all-linear"
        )
    found = {
        "r": raw.get("r", 8),
        "alpha": raw.get("lora_alpha", 8),
        "dropout": raw.get("lora_dropout", 0.0),
        "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
        "target_parameters": sorted(raw.get("target_parameters") or []),
        "use_rslora": bool(raw.get("use_rslora", False)),
        "use_dora": bool(raw.get("use_dora", False)),
    }
    if not found["target_modules"] and not found["target_parameters"]:
        raise ConfigError(f"{field}: the adapter {folder} names no target_modules")
    return found


def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """`cfg` with finetune.lora's settings taken from its init_from adapter (unchanged without
    one). A setting the config file sets itself to another value is a ConfigError naming both
    values and the fix: the adapter decides it (but for INIT_FROM_DEFAULTS_ONLY, where the
    config's own value wins)."""
    lora = cfg.finetune.lora
    if not lora.init_from:
        return cfg
    raw, _ = adapter_files(lora.init_from)
    found = init_from_settings(raw, lora.init_from)
    found = {k: v for k, v in found.items()
             if not (k in INIT_FROM_DEFAULTS_ONLY and k in lora.model_fields_set)}  # fmt: skip
    for key, value in found.items():
        mine = getattr(lora, key)
        same = sorted(mine) == value if isinstance(mine, list) and isinstance(value, list) else (
            mine == value
        )  # fmt: skip
        if key in lora.model_fields_set and not same:
            raise ConfigError(
                f"finetune.lora.{key}={mine!r}, but the adapter finetune.lora.init_from="
                f"{lora.init_from} has {INIT_FROM_DECIDES[key]}={value!r}: the adapter decides "
                f"it; drop finetune.lora.{key} from the config (or set it to {value!r})"
            )
    update = {"lora": lora.model_copy(update=found)}
    return cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update=update)})


def init_from_digest(cfg: FinetuneConfig) -> str:
    """A short hash of the init_from adapter's files (config and weights); "" without one."""
    if cfg.method != "lora" or not cfg.lora.init_from:
        return ""
    _, weights = adapter_files(cfg.lora.init_from)
    h = hashlib.sha256()
    for path in (weights.parent / "adapter_config.json", weights):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_init_from(cfg: RunConfig, model: torch.nn.Module) -> str:
    """Load the init_from adapter's weights into the LoRA `model` (built by `lora` with the
    adapter's settings, resolve_init_from); every adapter weight must find its place, else a
    ModelError names one that does not. Returns the start-up note."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    folder = cfg.finetune.lora.init_from
    _, weights = adapter_files(folder)
    try:
        state = load_peft_weights(str(weights.parent), device="cpu")
        with torch.no_grad():
            result = set_peft_model_state_dict(model, state)
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(
            f"finetune.lora.init_from: the adapter {folder} does not fit model.path="
            f"{cfg.model.path}: {first_line(e)}"
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        which = unexpected or missing
        what = "weights model.path has no place for" if unexpected else "LoRA weights it lacks"
        raise ModelError(
            f"finetune.lora.init_from: the adapter {folder} does not fit model.path="
            f"{cfg.model.path}: {len(which)} {what}, e.g. {which[0]!r}"
        )
    return f"starting from the adapter {folder} ({len(state)} tensors, {weights.name})"


def init_from_base_warning(cfg: RunConfig) -> str | None:
    """The warning when the init_from adapter records another base than model.path: the same
    model often goes by a hub id and a local folder, so it is not refused (a different
    architecture fails in load_init_from, naming the weights that do not fit)."""
    raw, _ = adapter_files(cfg.finetune.lora.init_from)
    base = raw.get("base_model_name_or_path")
    if not base or same_model(str(base), cfg.model.path):
        return None
    return (
        f"finetune.lora.init_from: the adapter was trained on {base}, this run's model.path is "
        f"{cfg.model.path}; training goes on from it if they are the same model"
    )


def same_model(a: str, b: str) -> bool:
    """Two model.path values name the same model: equal, or the same folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


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
