"""Attention: which kernel runs and why, and that samples sharing a row never attend to each other.

A GPU, and flash-attn being installed, cannot exist here: the decision tests give torch a GPU's
compute capability and put a flash_attn package on the path; everything lockstep does with
them is the real code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, run_cli, small_config

from lockstep.config import ModelConfig, RunConfig
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD
from lockstep.data.render import IGNORE
from lockstep.errors import ConfigError, ModelError
from lockstep.model import attention
from lockstep.model.load import BUILTIN_DIR, load_model
from lockstep.training.loss import CausalLMLoss

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def samples_of(lengths: list[list[int]], packed: bool = True, seed: int = 0) -> Samples:
    """Rows of random tokens; each row holds samples of the given lengths (packed: position ids
    restart at each; not packed: one sample per row, `lengths` one number each)."""
    rng = np.random.default_rng(seed)
    ids, labels, positions = [], [], []
    for row in lengths:
        n = sum(row)
        ids.append(rng.integers(10, 2000, n).astype(np.int64))
        lab = ids[-1].copy()
        starts = np.cumsum([0, *row[:-1]])
        lab[starts] = IGNORE
        labels.append(lab)
        positions.append(np.concatenate([np.arange(k) for k in row]))
    return Samples(ids, labels, "test", {}, positions if packed else None)


# ---- the batch the variable-length kernel gets --------------------------------------------


def test_packed_multi_row_batch_carries_every_sample_boundary():
    samples = samples_of([[3, 4], [5], [2, 2, 2]])  # width 7: rows 2 and 3 end in padding
    batch = collate(samples, np.array([0, 1, 2, PAD]), pad_id=3, varlen=True)
    assert batch["input_ids"].shape == (4, 7)
    # row 1: 3 + 4; row 2: 5 + 2 padding; row 3: 2 + 2 + 2 + 1 padding; row 4 (PAD): 7 padding
    expected = [0, 3, 7, 12, 14, 16, 18, 20, 21, 28]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32
        assert batch[key].tolist() == expected
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert type(batch["max_length_q"]) is int  # read by the kernel without a device copy
    assert "attention_mask" not in batch
    plain = collate(samples, np.array([0, 1, 2, PAD]), pad_id=3)
    assert not {"cu_seq_lens_q", "max_length_q"} & set(plain)  # only for the varlen kernel


def test_padding_free_row_carries_every_sample_boundary():
    samples = samples_of([[3], [5], [2]], packed=False)
    batch = collate(samples, np.array([0, PAD, 1, 2]), pad_id=3, padding_free=True, varlen=True)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 8, 10]
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    empty = collate(samples, np.array([PAD]), pad_id=3, padding_free=True, varlen=True)
    assert empty["cu_seq_lens_q"].tolist() == [0, 1] and empty["max_length_q"] == 1


# ---- what auto picks, and what is refused -------------------------------------------------

FLASH_OK = attention.Support("LlamaForCausalLM", sdpa=True, flash=True, flex=True)
NO_SDPA = attention.Support("Gemma2ForCausalLM", sdpa=False, flash=True, flex=True, softcap=True)


@pytest.fixture
def gpu(monkeypatch):
    """A GPU of the given compute capability as torch reports it (default: 9.0)."""

    def set_capability(major: int = 9, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    set_capability()
    return set_capability


def install_flash_attn(monkeypatch, tmp_path: Path, body: str = '__version__ = "2.7.4"\n') -> None:
    """A `flash_attn` package on the import path, whose __init__ is `body`."""
    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"dtype": "bfloat16", **kw})


def test_auto_picks_flash_only_where_it_runs(gpu, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    choice = attention.choose(model_cfg(), CUDA, True, FLASH_OK)
    assert choice.name == "sdpa" and "not installed" in choice.reason

    install_flash_attn(monkeypatch, tmp_path)
    choice = attention.choose(model_cfg(), CUDA, True, FLASH_OK)
    assert choice.name == "flash_attention_2" and choice.varlen
    assert attention.choose(model_cfg(), CUDA, False, FLASH_OK).name == "sdpa"  # one per row

    for cfg, device, support, why in [
        (model_cfg(dtype="float32"), CUDA, FLASH_OK, "float32"),
        (model_cfg(), CUDA, attention.Support("X", True, False, False), "does not support"),
    ]:
        choice = attention.choose(cfg, device, True, support)
        assert choice.name == "sdpa" and why in choice.reason and not choice.varlen
    # on a CPU, rows of several samples get sdpa over each sample (lockstep_segments)
    choice = attention.choose(model_cfg(), CPU, True, FLASH_OK)
    assert choice.name == attention.SEGMENTS and "CUDA GPU" in choice.reason and choice.varlen
    assert attention.choose(model_cfg(), CPU, False, FLASH_OK).name == "sdpa"  # one per row
    assert attention.choose(model_cfg(), CPU, True, NO_SDPA).name == "eager"

    gpu(7, 5)  # Turing: flash-attn 2 needs Ampere or newer
    choice = attention.choose(model_cfg(), CUDA, True, FLASH_OK)
    assert choice.name == "sdpa" and "7.5" in choice.reason
    assert attention.choose(model_cfg(), CUDA, True, NO_SDPA).name == "eager"


def test_auto_skips_a_flash_attn_that_does_not_import(gpu, monkeypatch, tmp_path):
    install_flash_attn(monkeypatch, tmp_path, 'raise ImportError("undefined symbol: _ZN3c10")\n')
    choice = attention.choose(model_cfg(), CUDA, True, FLASH_OK)
    assert choice.name == "sdpa" and "undefined symbol" in choice.reason


def test_explicit_kernel_that_cannot_run_is_refused_in_one_line(gpu, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    flash = model_cfg(attn_implementation="flash_attention_2")
    cases = [
        (flash, CUDA, FLASH_OK, "not installed"),
        (model_cfg(attn_implementation="flash_attention_2", dtype="float32"), CUDA, FLASH_OK,
         "float32"),
        (flash, CPU, FLASH_OK, "CUDA GPU"),
        (model_cfg(attn_implementation="sdpa"), CUDA, NO_SDPA, "Gemma2ForCausalLM does not"),
    ]  # fmt: skip
    for cfg, device, support, why in cases:
        with pytest.raises(ConfigError) as err:
            attention.choose(cfg, device, True, support)
        text = str(err.value)
        assert "\n" not in text and why in text and "model.attn_implementation" in text
    install_flash_attn(monkeypatch, tmp_path)
    assert attention.choose(flash, CUDA, True, FLASH_OK).varlen
    assert attention.choose(model_cfg(attn_implementation="eager"), CPU, True, NO_SDPA).name == (
        "eager"
    )


def test_padding_free_auto_follows_the_kernel(gpu, monkeypatch, tmp_path):
    install_flash_attn(monkeypatch, tmp_path)

    def free(device=CUDA, support=FLASH_OK, micro=4, **model) -> bool:
        cfg = RunConfig(
            model=model_cfg(**model),
            batch={"micro_size": micro},
            data={"train": [{"path": str(DEMO_DATA)}]},
        )
        return attention.padding_free(cfg, device, 100.0, support)

    assert free()  # auto picks the varlen kernel: rows without padding, no mask
    assert free(attn_implementation="flash_attention_2")
    assert not free(attn_implementation="sdpa")  # a dense [T, T] mask over the row
    assert not free(attn_implementation="eager")
    assert not free(dtype="float32")  # no flash in float32: sdpa runs
    assert free(device=CPU, attn_implementation="sdpa")  # short rows on a CPU: still worth it
    assert free(device=CPU)  # lockstep_segments: no mask, whatever the row's length
    assert free(device=CPU, attn_implementation="lockstep_segments")
    assert not free(device=CPU, support=NO_SDPA, micro=64)  # eager: the row limit applies


def test_explicit_lockstep_segments_needs_sdpa_support():
    cfg = model_cfg(attn_implementation="lockstep_segments")
    assert attention.choose(cfg, CPU, True, FLASH_OK).varlen
    with pytest.raises(ConfigError, match="does not support sdpa"):
        attention.choose(cfg, CPU, True, NO_SDPA)


def test_model_support_is_read_from_the_class(tmp_path, monkeypatch):
    from transformers import Gemma2ForCausalLM

    assert attention.model_support(ModelConfig()) == FLASH_OK
    gemma = ModelConfig(path=str(gemma2_folder(tmp_path)))
    assert attention.model_support(gemma) == NO_SDPA
    # transformers 5.17 declares sdpa for Gemma-2, whose sdpa path drops the soft-capping
    monkeypatch.setattr(Gemma2ForCausalLM, "_supports_sdpa", True)
    assert attention.model_support(gemma) == NO_SDPA


def test_flash_for_a_soft_capping_model_needs_flash_attn_2_6(gpu, monkeypatch, tmp_path):
    install_flash_attn(monkeypatch, tmp_path, '__version__ = "2.5.9"\n')
    choice = attention.choose(model_cfg(), CUDA, True, NO_SDPA)
    assert choice.name == "eager" and "2.6.0" in choice.reason and "soft-caps" in choice.reason
    assert attention.choose(model_cfg(), CUDA, True, FLASH_OK).name == "flash_attention_2"


# ---- samples in a packed batch see only themselves, whatever kernel runs -----------------


def tiny_family_folder(tmp_path: Path, family: str, sliding_window: int) -> Path:
    """A tiny random model of `family` (transformers' FamilyConfig / FamilyForCausalLM) with the
    built-in tokenizer and the given sliding window, saved once under tmp_path/family."""
    import transformers
    from transformers import AutoTokenizer

    folder = tmp_path / family.lower()
    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def gemma2_folder(tmp_path: Path) -> Path:
    """A tiny random Gemma-2 (soft-capping, sliding window) with the built-in tokenizer."""
    return tiny_family_folder(tmp_path, "Gemma2", sliding_window=6)


def mistral_folder(tmp_path: Path) -> Path:
    """A tiny random Mistral whose sliding window (4) is shorter than the test's samples."""
    return tiny_family_folder(tmp_path, "Mistral", sliding_window=4)


def cpu_kernels(cfg: ModelConfig) -> list[str]:
    """Every kernel to check on a CPU: sdpa where the class has it, eager, and auto's pick."""
    support = attention.model_support(cfg)
    picked = attention.choose(cfg, CPU, True, support).name
    return sorted({picked, "eager", *(["sdpa"] if support.sdpa else [])})


@pytest.mark.parametrize("family", ["builtin", "gemma2", "mistral"])
def test_logits_in_a_packed_multi_row_batch_equal_each_sample_alone(tmp_path, family):
    """Every CPU kernel, lockstep_segments with the boundaries included (and a sliding window
    shorter than some samples: Mistral's 4)."""
    folders = {"gemma2": gemma2_folder, "mistral": mistral_folder}
    path = str(folders[family](tmp_path)) if family in folders else "builtin:tiny"
    rows = [[5, 9, 3], [11, 4], [7]]  # width 17: rows 2 and 3 end in padding
    samples = samples_of(rows)
    kernels = cpu_kernels(ModelConfig(path=path))
    assert "eager" in kernels and len(kernels) >= (1 if family == "gemma2" else 3)
    assert (attention.SEGMENTS in kernels) == (family != "gemma2")  # auto's pick with sdpa
    for kernel in kernels:
        batch = collate(samples, np.array([0, 1, 2]), 3, varlen=kernel == attention.SEGMENTS)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model = load_model(ModelConfig(path=path, attn_implementation=kernel), init_seed=1).eval()
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            packed = model(**inputs, use_cache=False).logits
            for r, lengths in enumerate(rows):
                at = 0
                for n in lengths:
                    alone = model(input_ids=batch["input_ids"][r : r + 1, at : at + n]).logits
                    torch.testing.assert_close(
                        packed[r : r + 1, at : at + n], alone, atol=1e-5, rtol=1e-5,
                        msg=lambda m: f"{family} {kernel} row {r} at {at}: {m}",  # noqa: B023
                    )  # fmt: skip
                    at += n


def reference_varlen_attention(module, query, key, value, attention_mask, scaling=None,
                               cu_seq_lens_q=None, max_length_q=None, **kwargs):  # fmt: skip
    """What flash-attention's variable-length kernel computes, from the boundaries alone: causal
    attention inside each segment of the rows laid end to end. No position ids, no mask."""
    assert cu_seq_lens_q is not None and isinstance(max_length_q, int), "boundaries not passed"
    b, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, heads, dim)
    k = key.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    v = value.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    assert max(np.diff(bounds)) == max_length_q
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            is_causal=True, scale=scaling,
        ).transpose(0, 1)  # fmt: skip
    return out.view(b, length, heads, dim), None


@pytest.mark.parametrize("chunk", [None, 4])
def test_boundaries_reach_the_attention_kernel_through_the_loss(chunk):
    """The loss module hands the boundaries to every attention layer (full and chunked loss):
    a kernel that sees only them gives each sample its loss alone."""
    rows = [[5, 9, 3], [11, 4], [7]]
    samples = samples_of(rows)
    model = kernel_model("lockstep_reference_varlen", reference_varlen_attention).eval()
    engine = CausalLMLoss(model, chunk)
    batch = collate(samples, np.array([0, 1, 2]), pad_id=3, varlen=True)
    sdpa = CausalLMLoss(load_model(ModelConfig(attn_implementation="sdpa"), init_seed=1), chunk)
    with torch.no_grad():
        got = engine(batch)
        want = sdpa(collate(samples, np.array([0, 1, 2]), pad_id=3))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(AssertionError, match="boundaries not passed"), torch.no_grad():
        engine(collate(samples, np.array([0, 1, 2]), pad_id=3))


@pytest.mark.parametrize("padding_free", [False, True])
def test_eval_loss_with_the_varlen_kernel_is_the_sdpa_eval_loss(padding_free):
    """evaluate() hands the boundaries on too: eval_loss over packed micro-batches of 3 rows
    (or padding-free rows) with a kernel that sees only them equals sdpa's."""
    from lockstep.dist import Dist
    from lockstep.training.evaluate import evaluate

    rows = [[5, 9, 3], [11, 4], [7], [6, 6], [13]]
    samples = samples_of(rows) if not padding_free else samples_of([[n] for n in [5, 9, 11, 7]])
    varlen = kernel_model("lockstep_reference_varlen", reference_varlen_attention)
    sdpa = load_model(ModelConfig(attn_implementation="sdpa"), init_seed=1)
    got = evaluate(varlen, samples, Dist(), 3, 3, padding_free, varlen=True)
    want = evaluate(sdpa, samples, Dist(), 3, 3, padding_free)
    assert got["eval_tokens"] == want["eval_tokens"] > 0
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)


def whole_row_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over each whole row, blind to sample boundaries: what flash-attention
    ran for packed rows of more than one row before lockstep passed the boundaries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **{
        k: v for k, v in kwargs.items() if k in ("scaling", "dropout")})  # fmt: skip


def kernel_model(name, fn) -> torch.nn.Module:
    """The built-in model running attention `fn`, registered with transformers as `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, flash_attention_mask)
    kernel = ModelConfig().model_copy(update={"attn_implementation": name})  # not a user choice
    return load_model(kernel, init_seed=1)


def test_isolation_check_refuses_models_whose_samples_mix(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    sdpa = attention.Choice("sdpa", "")
    varlen = attention.Choice("flash_attention_2", "")  # batches carry the boundaries
    for model, choice in [
        (load_model(ModelConfig(attn_implementation="sdpa"), init_seed=1), sdpa),
        (load_model(ModelConfig(attn_implementation="eager"), init_seed=1), sdpa),
        (load_model(ModelConfig(path=str(gemma2_folder(tmp_path))), init_seed=1), sdpa),
        (kernel_model("lockstep_reference_varlen", reference_varlen_attention), varlen),
    ]:
        attention.check_isolation(model.train(), choice, CPU, None)
        assert model.training  # left as it was
    mamba = MambaForCausalLM(MambaConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=1,
                                         state_size=4))  # fmt: skip
    leaky = kernel_model("lockstep_whole_row", whole_row_attention)
    for model, name in [(mamba, "MambaForCausalLM"), (leaky, "LlamaForCausalLM")]:
        with pytest.raises(ModelError) as err:
            attention.check_isolation(model, sdpa, CPU, None)
        assert str(err.value).startswith(f"{name} with attention ")
        assert "data.packing=false and data.padding_free=false" in str(err.value)


# ---- through the CLI ---------------------------------------------------------------------


@pytest.mark.slow  # ~20 s: the whole CLI run on a CPU
def test_gemma2_trains_packed_under_auto(tmp_path):
    cfg = small_config(tmp_path, model={"path": str(gemma2_folder(tmp_path))},
                       data={"max_length": 64, "packing": True, "train": [
                           {"path": str(DEMO_DATA), "format": "alpaca", "max_samples": 64}]},
                       batch={"global_size": 4, "micro_size": 2}, train={"max_steps": 2})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "attention: eager (auto: " in res.stderr
    assert "Gemma2ForCausalLM does not support sdpa" in res.stderr


def test_explicit_flash_on_a_cpu_is_refused_before_loading(tmp_path):
    cfg = small_config(tmp_path, model={"attn_implementation": "flash_attention_2"})
    res = run_cli("train", str(cfg))
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.startswith("lockstep: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "flash_attention_2 cannot run: it needs a CUDA GPU" in lines[0]
    assert "model.attn_implementation=auto" in lines[0]
