"""Model and tokenizer: the built-in tiny model, a local Hugging Face folder, or a hub id."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lockstep import hub
from lockstep.config import ModelConfig
from lockstep.errors import ModelError, first_line

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())


def resolve(path: str) -> tuple[str, bool]:
    """(where to load from, whether it is a built-in whose weights are initialised fresh)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name not in builtin_names():
            raise ModelError(
                f"model.path: unknown built-in model {path!r}; available: "
                + ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
            )
        return str(BUILTIN_DIR / name), True
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model.path: folder {str(p)!r} has no config.json; point it at a folder "
                "written by save_pretrained"
            )
        return str(p), False
    if not hub.looks_like_id(path):
        raise ModelError(f"model.path: folder {str(p)!r} not found (looked in {p.resolve()})")
    problem = hub.offline_problem(path, "model", "config.json")
    if problem:
        raise ModelError(
            f"model.path {path!r} is not a local folder, and it cannot be loaded as a Hugging "
            f"Face Hub name: {problem}. Download it where there is a connection "
            f"(huggingface-cli download {path} --local-dir DIR) and set model.path to DIR"
        )
    return path, False  # a hub id


def load_config(cfg: ModelConfig) -> Any:
    """The model's transformers config (no weights), errors in words."""
    from transformers import AutoConfig

    where, _ = resolve(cfg.path)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/HF errors alike
        raise ModelError(
            f"model.path {cfg.path!r}: cannot load the model config: {first_line(e)}"
        ) from None


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> Any:
    """The model's tokenizer; `chat_template` (data/templates.configured) replaces its template,
    so the run's template is the one that renders the data and is saved with the model."""
    where, _ = resolve(cfg.path)
    failure = f"model.path {cfg.path!r}: cannot load the tokenizer"
    tok = pretrained_tokenizer(where, cfg.trust_remote_code, failure)
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(
                f"model.path {cfg.path!r}: the tokenizer has neither pad nor eos token"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, init_seed: int, quantize: str | None = None) -> torch.nn.Module:
    """Load pretrained weights, or initialise a built-in model from `init_seed` (same on all ranks).

    `cfg.attn_implementation` is passed to transformers as it is; `auto` (a caller that did not
    resolve it with model/attention.choose) lets transformers pick: sdpa where the model class
    supports it, else eager. lockstep_segments is registered with transformers here.

    `quantize` ("4bit"/"8bit", QLoRA on CUDA): the weights are loaded quantised by bitsandbytes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    where, fresh = resolve(cfg.path)
    dtype = weights_dtype(cfg)
    attn = None if cfg.attn_implementation == "auto" else cfg.attn_implementation
    if attn is not None:  # lockstep's own kernel: transformers learns it first
        from lockstep.model import attention  # (it imports this module)

        if attn == attention.SEGMENTS:
            attention.register_segments()
    common: dict = {"trust_remote_code": cfg.trust_remote_code}
    if quantize:
        from transformers import BitsAndBytesConfig

        common["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit",
            load_in_8bit=quantize == "8bit",
            bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
            bnb_4bit_quant_type="nf4",
        )
        common["device_map"] = {"": torch.cuda.current_device()}
    failure = f"model.path {cfg.path!r}: cannot load the model"
    if not fresh:
        return pretrained_model(where, failure, dtype=dtype, attn_implementation=attn, **common)
    try:
        mcfg = AutoConfig.from_pretrained(where, **common)
        # a private generator stream: initialisation must not consume or depend on global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return AutoModelForCausalLM.from_config(
                mcfg, dtype=dtype, attn_implementation=attn, **common
            )
    except Exception as e:
        raise ModelError(f"{failure}: {first_line(e)}") from None


def pretrained_model(where: str, failure: str, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(where, **kwargs)`: the weights saved in a folder,
    or a hub id's. Loading bars are held back for a local folder (a hub id may download: its
    bars stay). Any failure is one ModelError, `failure: <the first line of the cause>`."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_bars(Path(where).is_dir()):
            return AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/HF errors alike
        raise ModelError(f"{failure}: {first_line(e)}") from None


def pretrained_tokenizer(where: str | Path, trust_remote_code: bool, failure: str) -> Any:
    """`AutoTokenizer.from_pretrained(where)`, as it was saved (its pad token is the caller's
    to choose). Any failure is one ModelError, `failure: <the first line of the cause>`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/HF errors alike
        raise ModelError(f"{failure}: {first_line(e)}") from None


def weights_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the weights are held in: float32 master weights unless model.master_weights=same."""
    return DTYPES[cfg.dtype] if cfg.master_weights == "same" else torch.float32


@contextmanager
def quiet_bars(quiet: bool = True) -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" progress bars held back while
    lockstep loads a local folder or writes one: over in seconds, they only cut through
    lockstep's own lines. Its setting is restored after; a load that may download keeps its
    download bars (quiet=False: transformers turns both kinds off together)."""
    from transformers.utils import logging as hf_logging

    if not quiet or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Wrap a model in PEFT without transformers' `FutureWarning: is_gradient_checkpointing is
    deprecated`: PEFT reads that property whenever it wraps a model (every LoRA run, eval,
    export, chat), in its own code, so the user has nothing to change. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
        )
        yield
