"""Which attention kernel runs, why, and what a batch must carry for it.

Samples that share a row (packing, padding-free micro-batches) must never attend to each other.
Every kernel lockstep runs keeps them apart:

- flash_attention_2 gets the sample boundaries (`cu_seq_lens_q/k`, `max_length_q/k`,
  `varlen_kwargs`) with every batch and runs its variable-length kernel: no mask at all, and
  nothing for transformers to recompute in each layer.
- lockstep_segments (SEGMENTS, lockstep's own, registered with transformers) gets the same
  boundaries and runs sdpa on each sample of the row on its own, causal, with no mask: the
  work of each sample alone, however long the row. A batch without boundaries (generation,
  one sample per row) runs transformers' sdpa with its mask.
- sdpa, eager and flex_attention get position ids that restart at every sample and no 2-D
  attention mask: transformers derives a block-diagonal causal mask from them (sdpa and eager:
  a dense [rows, 1, length, length] mask, whose cost grows with the square of the row;
  flex_attention: a block-sparse one).

`model.attn_implementation: auto` picks flash_attention_2 where samples share rows and it can
run (a CUDA GPU of compute capability 8.0 or newer, model.dtype bfloat16/float16, flash-attn
that imports, a model class that supports it); otherwise, on a CPU where samples share rows
and the model class supports sdpa, lockstep_segments; otherwise sdpa, or eager for a model class
without sdpa (Gemma-2, whose soft-capping sdpa cannot do). It never picks flex_attention (not
measured on GPUs by lockstep's tests): choose it explicitly. An explicitly requested kernel
that cannot run is refused before the model loads. Before training on shared rows,
`check_isolation` verifies on the model itself that its samples stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from typing import Any

import numpy as np
import torch

from lockstep.config import ModelConfig, RunConfig
from lockstep.errors import ConfigError, ModelError, first_line
from lockstep.model.adapters import causal_lm
from lockstep.model.load import load_config

FLASH = "flash_attention_2"
SEGMENTS = "lockstep_segments"  # sdpa over each sample of a shared row (segment_sdpa)
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # varlen_kwargs
FLASH_MIN_VERSION = (2, 3, 3)  # the oldest flash-attn 2 transformers accepts
FLASH_SOFTCAP_VERSION = (2, 6, 0)  # the first that soft-caps attention logits (Gemma-2)
UNKNOWN_CLASS = "the model class is not one transformers ships: its support is unknown"
CPU_ROW_LIMIT = 1024  # tokens: longer padding-free rows cost more in CPU attention than padding


@dataclass(frozen=True)
class Support:
    """What a model class declares it can run (None: unknown, a class transformers does not ship).

    `softcap`: the model soft-caps its attention logits, which sdpa cannot do (some
    transformers versions still declare sdpa for such a class and drop the capping).
    """

    name: str | None
    sdpa: bool | None
    flash: bool | None
    flex: bool | None
    softcap: bool = False


@dataclass(frozen=True)
class Choice:
    """The kernel passed to transformers (None: transformers' own default) and why."""

    name: str | None
    reason: str

    @property
    def varlen(self) -> bool:
        """Batches carry the sample boundaries for a variable-length kernel."""
        return self.name in (FLASH, SEGMENTS)


def model_support(cfg: ModelConfig) -> Support:
    """The attention kernels the model class of `cfg.path` supports, read from its config only.

    A model whose class is not one transformers ships (remote code) has unknown (None) flags:
    transformers then chooses its kernel (sdpa where the class has it, else eager).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    mcfg = load_config(cfg)
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    softcap = getattr(text, "attn_logit_softcapping", None) is not None
    try:
        classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(mcfg)]
    except KeyError:  # remote code: its flags are known only once loaded
        name = (getattr(mcfg, "architectures", None) or [type(mcfg).__name__])[0]
        return Support(name, False if softcap else None, None, None, softcap)
    if isinstance(classes, (list, tuple)):
        named = {c.__name__: c for c in classes}
        arch = [a for a in getattr(mcfg, "architectures", None) or [] if a in named]
        classes = named[arch[0]] if arch else classes[0]
    sdpa = _flag(classes, "_supports_sdpa")
    return Support(
        classes.__name__,
        False if softcap else sdpa,
        _flag(classes, "_supports_flash_attn") or _flag(classes, "_supports_flash_attn_2"),
        _flag(classes, "_supports_flex_attn"),
        softcap,
    )


def _flag(cls: type, name: str) -> bool | None:
    value = getattr(cls, name, False)
    return value if isinstance(value, bool) else None  # a property: known only on an instance


def flash_problem(cfg: ModelConfig, device: torch.device, support: Support) -> str | None:
    """Why flash_attention_2 cannot run this model here (None: it can)."""
    problem = _flash_device_problem(cfg, device, support.softcap)
    if problem is None and not support.flash:
        known = support.flash is False
        return f"{support.name} does not support it" if known else UNKNOWN_CLASS
    return problem


def _flash_device_problem(cfg: ModelConfig, device: torch.device, softcap: bool) -> str | None:
    """Why flash_attention_2 cannot run on this device in this dtype (None: it can)."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU and this run is on {device.type}"
    if cfg.dtype == "float32":
        return "it does not run in float32; it needs model.dtype bfloat16 or float16"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}"
    return _flash_import_problem(softcap)


def no_sdpa(support: Support) -> str:
    """Why sdpa cannot run this model, in words."""
    why = " (it soft-caps attention logits)" if support.softcap else ""
    return f"{support.name} does not support sdpa{why}"


def _flash_import_problem(softcap: bool = False) -> str | None:
    """Why the flash_attn package cannot be used (None: it imports and is recent enough)."""
    if find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    try:
        module = import_module("flash_attn")
    except Exception as e:  # a build for another torch fails with OSError/ImportError alike
        return f"flash_attn does not import ({first_line(e, 120)})"
    version = str(getattr(module, "__version__", "0"))
    numbers = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    if numbers < FLASH_MIN_VERSION:
        return f"flash-attn {version} is older than 2.3.3"
    if softcap and numbers < FLASH_SOFTCAP_VERSION:
        return f"flash-attn {version} cannot soft-cap attention logits (2.6.0 can)"
    return None


def choose(cfg: ModelConfig, device: torch.device, shared_rows: bool, support: Support) -> Choice:
    """model.attn_implementation resolved for this model, device and batch layout.

    `shared_rows`: several samples share a row (packing or padding-free). An explicit kernel
    that cannot run here raises a ConfigError saying why and what to set instead.
    """
    asked = cfg.attn_implementation
    if asked != "auto":
        refuse_unrunnable(cfg, device, support)
        return Choice(asked, "set by model.attn_implementation")
    flash_no = flash_problem(cfg, device, support) if shared_rows else None
    if shared_rows and flash_no is None:
        return Choice(FLASH, "auto: samples share rows; variable-length kernel, no mask")
    why = f"auto: flash_attention_2 not used: {flash_no}; " if flash_no else "auto: "
    if shared_rows and support.sdpa and device.type == "cpu":
        return Choice(SEGMENTS, why + "samples share rows; sdpa over each sample, no mask")
    rows = "rows of several samples get a block-diagonal mask from their position ids"
    rows = rows if shared_rows else "one sample per row"
    if support.sdpa is None:
        return Choice(None, why + f"transformers' default for this model; {rows}")
    if support.sdpa:
        return Choice("sdpa", why + rows)
    return Choice("eager", why + f"{no_sdpa(support)}; {rows}")


def refuse_unrunnable(cfg: ModelConfig, device: torch.device, support: Support) -> None:
    """An explicitly requested kernel that cannot run here stops the run before loading."""
    asked = cfg.attn_implementation
    if asked == FLASH:
        problem = flash_problem(cfg, device, support)
        if problem not in (None, UNKNOWN_CLASS):  # transformers checks a class it cannot see
            raise ConfigError(
                f"model.attn_implementation={FLASH} cannot run: {problem}. Set "
                "model.attn_implementation=auto (lockstep picks a kernel that runs), or fix that"
            )
    supported = {"sdpa": support.sdpa, SEGMENTS: support.sdpa, "flex_attention": support.flex}
    if supported.get(asked) is False:
        problem = (
            no_sdpa(support) if asked != "flex_attention" else f"{support.name} does not support it"
        )
        raise ConfigError(
            f"model.attn_implementation={asked}: {problem}. Set "
            "model.attn_implementation=auto (lockstep picks one the model supports) or eager"
        )


def padding_free(
    cfg: RunConfig, device: torch.device, mean_length: float, support: Support
) -> bool:
    """data.padding_free, with `auto` resolved for this device, model and data (see config.py).

    On a GPU only where the variable-length kernel runs: sdpa and eager would apply a dense
    [T, T] mask over the whole row. On a CPU always where lockstep_segments runs (a model class
    with sdpa); with another kernel, the block-diagonal mask over the row costs the square of
    its length: worth it only while rows stay short.
    """
    choice = cfg.data.padding_free
    if choice != "auto":
        return choice
    if cfg.data.packing:  # packed rows are already full
        return False
    if device.type == "cuda":
        return cfg.model.attn_implementation in ("auto", FLASH) and (
            flash_problem(cfg.model, device, support) is None
        )
    if cfg.model.attn_implementation in ("auto", SEGMENTS) and support.sdpa:
        return True  # lockstep_segments: each sample's own attention, whatever the row's length
    return cfg.batch.micro_size * mean_length <= CPU_ROW_LIMIT


def segment_sdpa(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """lockstep_segments: attention for rows that hold several samples, each sample on its own.

    query [rows, heads, T, d], key/value [rows, kv_heads, T, d]; `cu_seq_lens_q` (varlen_kwargs)
    cuts the rows, laid end to end, into segments, and each segment gets causal sdpa alone: no
    mask, no work across samples. A model's sliding window (`sliding_window`) limits a segment
    longer than it with a banded mask. Without boundaries (generation, one sample per row) this
    is transformers' sdpa with its mask. Returns [rows, T, heads, d], as transformers' kernels do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    rows, heads, width, dim = query.shape
    groups = heads // key.size(1)

    def flat(x: torch.Tensor) -> torch.Tensor:  # [rows, h, T, d] -> [1, heads, rows x T, d]
        x = x.transpose(0, 1).reshape(1, x.size(1), rows * width, dim)
        return x.repeat_interleave(groups, dim=1) if x.size(1) != heads else x

    q, k, v = flat(query), flat(key), flat(value)
    window = kwargs.get("sliding_window")
    cuts = bounds.tolist()
    out = []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        mask = None
        if window and end - start > window:
            i = torch.arange(end - start, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask,
                dropout_p=dropout, is_causal=mask is None, scale=scaling,
            )
        )  # fmt: skip
    merged = torch.cat(out, dim=2).reshape(heads, rows, width, dim)
    return merged.permute(1, 2, 0, 3).contiguous(), None


def register_segments() -> None:
    """Make lockstep_segments known to transformers (its attention and, for batches without
    sample boundaries, sdpa's mask) before a model loads with it (model/load.py)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENTS, segment_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTS, sdpa_mask)


def varlen_kwargs(position_ids: np.ndarray) -> dict[str, Any]:
    """The sample boundaries flash-attention's variable-length kernel takes, for rows whose
    position ids restart at 0 at every sample (packed or padding-free rows, data/collate.py).

    The rows are laid end to end and cut wherever a position id is 0, so every token is in
    exactly one segment: each sample is one, and the padding after a row's last sample is one
    of its own (no sample attends to it, and it attends to no sample). `cu_seq_lens_q/k`: int32
    offsets [0, end of segment 1, ..., rows x width]; `max_length_q/k`: the longest segment,
    a Python int, so the kernel reads it without a device-to-host copy.
    """
    flat = np.asarray(position_ids).reshape(-1)
    cu = np.append(np.flatnonzero(flat == 0), len(flat)).astype(np.int32)
    longest = int(np.diff(cu).max())
    q, k, max_q, max_k = VARLEN_KEYS
    return {q: torch.from_numpy(cu), k: torch.from_numpy(cu.copy()), max_q: longest,
            max_k: longest}  # fmt: skip


PROBE = ((9, 7, 4), (24,))  # sample lengths per row: several in the first, then padding
LEAK_LIMIT = 1e-2  # of the change a sample's own logits see: far above bf16 noise, far below a leak


def check_isolation(
    model: torch.nn.Module, choice: Choice, device: torch.device, autocast: torch.dtype | None
) -> None:
    """Refuse a model and kernel whose samples see each other when they share a row.

    Two rows of samples (the first ending in padding) run twice, the second time with the
    first sample's tokens changed: the logits of every other sample must not move. Whatever
    the kernel, transformers keeps packed samples apart only through the model's own mask and
    attention code, which a model may not use (recurrent layers, custom code); this finds out
    before a step trains on mixed samples. `autocast`: the compute dtype of mixed precision.
    """
    width = max(sum(r) for r in PROBE)
    vocab = int(model.get_input_embeddings().num_embeddings)
    positions = np.zeros((len(PROBE), width), dtype=np.int64)
    for r, row in enumerate(PROBE):
        ends = np.cumsum([0, *row, width - sum(row)])
        for s, e in zip(ends[:-1], ends[1:], strict=True):
            positions[r, s:e] = np.arange(e - s)
    tokens = (torch.arange(len(PROBE) * width).view(len(PROBE), width) * 7919 + 11) % vocab
    changed = tokens.clone()
    first = PROBE[0][0]
    changed[0, :first] = (changed[0, :first] + 1 + vocab // 2) % vocab
    batch = {"position_ids": torch.from_numpy(positions)}
    if choice.varlen:
        batch.update(varlen_kwargs(positions))
    batch = to_device(batch, device)
    was_training = model.training
    model.eval()
    try:
        precision = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
        with torch.no_grad(), precision:
            logits = [
                model(input_ids=t.to(device), use_cache=False, **batch).logits.float()
                for t in (tokens, changed)
            ]
    finally:
        model.train(was_training)
    delta = (logits[1] - logits[0]).abs()
    own = float(delta[0, :first].max())
    leak = max(float(delta[0, first : sum(PROBE[0])].max()), float(delta[1:].max()))
    if leak > LEAK_LIMIT * max(own, 1e-6):
        raise ModelError(
            f"{type(causal_lm(model)).__name__} with attention {model.config._attn_implementation}"
            f": a sample sees the other samples of its row (their tokens moved its logits by "
            f"{leak:.3g}), so packed or padding-free rows would train on mixed samples. Set "
            "data.packing=false and data.padding_free=false (or try another "
            "model.attn_implementation)"
        )


def to_device(
    batch: dict[str, torch.Tensor | int], device: torch.device, non_blocking: bool = False
) -> dict[str, torch.Tensor | int]:
    """The batch on `device`; its plain numbers (`max_length_q/k`) stay host-side ints."""
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
