"""Speed switches: each one runs, and where it should, gives the plain path's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli, small_config
from safetensors.torch import load_file

from lockstep.config import ModelConfig
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD, Order
from lockstep.data.render import IGNORE
from lockstep.model.load import load_model
from lockstep.report.metrics import read
from lockstep.training.loss import CausalLMLoss, chunked_cross_entropy, with_target_index

STEPS = 6


def random_batch(seed: int = 0, rows: int = 3, width: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2048, (rows, width), generator=g)
    labels = ids.roll(-1, 1).clone()
    labels[:, :7] = IGNORE  # a prompt
    labels[-1, 25:] = IGNORE  # a shorter, right-padded row
    mask = torch.ones_like(ids)
    mask[-1, 26:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def loss_and_grads(model, chunk, batch):
    model.zero_grad()
    loss = CausalLMLoss(model, chunk)(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tied):
    model = load_model(ModelConfig(), init_seed=3)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    batch = random_batch()
    plain, plain_grads = loss_and_grads(model, None, batch)
    assert not CausalLMLoss(model, None).chunked and CausalLMLoss(model, 5).chunked
    for chunk in (5, 1024):  # many chunks, one chunk
        chunked, grads = loss_and_grads(model, chunk, batch)
        assert chunked == pytest.approx(plain, rel=1e-5)
        for name, g in plain_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=2e-5, msg=name)
    with torch.no_grad():  # evaluation: no gradients computed, same loss
        assert CausalLMLoss(model, 7)(batch).item() == pytest.approx(plain, rel=1e-5)


PEAK_SCRIPT = """
import resource, sys, torch
from lockstep.training.loss import chunked_cross_entropy
tokens, hidden, vocab = 8192, 64, 32768
torch.manual_seed(0)
h = torch.randn(tokens, hidden, requires_grad=True)
w = torch.randn(vocab, hidden, requires_grad=True)
y = torch.randint(0, vocab, (tokens,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chunked_cross_entropy(h, w, y, 512).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_chunked_loss_never_holds_the_full_logits():
    """Peak memory of the chunked loss grows by about chunk x vocab, not tokens x vocab."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    full_logits = 8192 * 32768 * 4  # 1 GiB of float32 logits
    assert int(res.stdout) < full_logits / 4


def test_chunked_gradients_equal_autograd_of_the_plain_loss():
    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(500, 16, requires_grad=True)
    y = torch.randint(0, 500, (300,))
    (chunked_cross_entropy(h, w, y, 64) * 0.5).backward()  # an upstream gradient too
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum") * 0.5).backward()
    torch.testing.assert_close(g_h, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_weight_gradient_allocates_no_weight_sized_tensor_per_chunk(dtype):
    """The LM head's gradient is accumulated in place: the number of [vocab, hidden] tensors
    created does not grow with the number of chunks (it was two per chunk under bf16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, hidden, chunks = 512, 16, 12

    class CountWeightSized(TorchDispatchMode):
        created = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not isinstance(out, torch.Tensor) or out.numel() != vocab * hidden:
                return out
            inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            memory = out.untyped_storage().data_ptr()
            if all(a.untyped_storage().data_ptr() != memory for a in inputs):  # not a view
                CountWeightSized.created += 1
            return out

    torch.manual_seed(0)
    h = torch.randn(chunks * 8, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (chunks * 8,))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), CountWeightSized():
        loss = chunked_cross_entropy(h, w, y, 8)
    assert CountWeightSized.created <= 3, CountWeightSized.created
    loss.backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_of_no_targets_is_zero_with_zero_gradients(dtype):
    """The head's gradient is written by the first chunk, not zero-filled first: with no target
    at all (a micro-batch of prompts only) it must still come out zero, not uninitialised."""
    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(512, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = chunked_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), 8)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_chunked_loss_under_bfloat16_autocast_is_close_to_plain():
    model = load_model(ModelConfig(), init_seed=3)
    batch = random_batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = CausalLMLoss(model, None)(batch).item()
        chunked = CausalLMLoss(model, 16)(batch).item()
    assert chunked == pytest.approx(plain, rel=2e-2)


def test_padding_free_micro_batch_has_the_padded_loss():
    model = load_model(ModelConfig(), init_seed=5)
    rng = np.random.default_rng(0)
    lens = [9, 23, 4, 17]
    ids = [rng.integers(3, 2048, n) for n in lens]
    labels = [np.where(np.arange(n) < 3, IGNORE, x) for n, x in zip(lens, ids, strict=True)]
    samples = Samples(ids, labels, "fp", {})
    loss = CausalLMLoss(model, 8)
    slots = np.array([0, 1, PAD, 2, 3])
    padded, free = collate(samples, slots, 0), collate(samples, slots, 0, padding_free=True)
    assert free["input_ids"].shape == (1, sum(lens))  # not one padding token
    assert (free["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()
    with torch.no_grad():
        assert loss(free).item() == pytest.approx(loss(padded).item(), rel=1e-5)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_length_grouping_keeps_every_step_and_cuts_padding(world):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 500, 203)
    plain = Order(11, 203, 32, 2, world)
    grouped = Order(11, 203, 32, 2, world, lengths)
    padded = {"plain": 0, "grouped": 0}
    for step in range(plain.steps_per_epoch):
        assert (grouped.global_batch(step) == plain.global_batch(step)).all()
        for name, order in (("plain", plain), ("grouped", grouped)):
            mbs = [mb for r in range(world) for mb in order.micro_batches(step, r)]
            real = np.sort(np.concatenate(mbs))
            assert (real == np.sort(order.global_batch(step))).all()  # same samples, once each
            for mb in mbs:
                lens = [lengths[i] for i in mb if i != PAD]
                padded[name] += len(lens) * max(lens, default=0) - sum(lens)
    assert padded["grouped"] < padded["plain"] / 2


# ---------------------------------------------------------------- end to end, per switch


def train(tmp_path, name: str, *overrides: str):
    folder = tmp_path / name
    folder.mkdir()
    cfg = small_config(
        folder, train={"max_steps": STEPS}, batch={"global_size": 8, "micro_size": 2}
    )
    res = run_cli("train", str(cfg), *overrides)
    assert res.returncode == 0, res.stderr
    return read(folder / "out" / "metrics.jsonl"), folder / "out"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    rows, _ = train(tmp_path_factory.mktemp("speed"), "base")
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains: comparisons are not of constants
    return rows


@pytest.mark.parametrize(
    ("overrides", "rel"),
    [
        (["train.loss_chunk=null"], 1e-5),
        pytest.param(["train.gradient_checkpointing=true"], 1e-5, marks=pytest.mark.slow),
        pytest.param(["optim.fused=false"], 1e-5, marks=pytest.mark.slow),
        pytest.param(["data.num_workers=2"], 0, marks=pytest.mark.slow),
        (["data.padding_free=false"], 1e-5),  # auto picks padding-free rows for this data
        (["data.group_by_length=false"], 1e-5),
        pytest.param(
            ["data.padding_free=false", "data.group_by_length=false", "train.loss_chunk=3"],
            1e-5,
            marks=pytest.mark.slow,
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_switch_matches_the_default_path(tmp_path, baseline, overrides, rel):
    rows, _ = train(tmp_path, "switch", *overrides)
    assert [r["batch_sha"] for r in rows] == [r["batch_sha"] for r in baseline]
    assert [r["target_tokens"] for r in rows] == [r["target_tokens"] for r in baseline]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in baseline], rel=rel)


@pytest.mark.slow
@pytest.mark.parametrize(("master", "stored"), [("float32", "F32"), ("same", "BF16")])
def test_bfloat16_mixed_and_pure_precision(tmp_path, baseline, master, stored):
    rows, out = train(tmp_path, master, "model.dtype=bfloat16", f"model.master_weights={master}")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in baseline], rel=5e-2)
    weights = load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[stored]
    assert {t.dtype for t in weights.values()} == {dtype}


@pytest.mark.slow
def test_compiled_blocks_match_the_eager_path(tmp_path, baseline):
    rows, _ = train(tmp_path, "compiled", "train.compile=true")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in baseline], rel=1e-4)


@pytest.mark.parametrize("master", ["float32", "same"])
def test_float16_training_is_refused_mixed_and_pure(tmp_path, master):
    """Mixed float16 needs loss scaling; pure float16 zeroes AdamW's second moment."""
    cfg = small_config(tmp_path)
    res = run_cli("train", str(cfg), "model.dtype=float16", f"model.master_weights={master}")
    assert res.returncode != 0
    assert "model.dtype=float16 cannot train" in res.stderr and "bfloat16" in res.stderr
    assert not (tmp_path / "out").exists()


def test_pure_float16_would_lose_adams_second_moment():
    """Why the refusal above: a realistic gradient squared underflows to 0 in float16."""
    grad = torch.tensor(1e-4, dtype=torch.float16)
    assert float(grad * grad) == 0.0
    assert float(grad.to(torch.bfloat16) ** 2) > 0.0


def test_host_reads_per_step_do_not_grow_with_accumulation(tmp_path):
    """The loss stays on the device through a step's micro-batches, and target positions are
    found on the host: lockstep's own code makes no scalar read (`.item()`) nor boolean-mask
    selection (whose size the host must wait for on a GPU) per micro-batch. (Waits inside
    transformers, such as its mask building from position ids, are the attention path's.)"""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    def called_from_lockstep() -> bool:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename:
                return "/lockstep/" in frame.filename
        return False

    from lockstep import config
    from lockstep.dist import Dist
    from lockstep.training.loop import run

    class CountWaits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.waits = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            masked = func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            waits = masked or func is torch.ops.aten._local_scalar_dense.default
            if waits and called_from_lockstep():
                self.waits += 1
            return func(*args, **(kwargs or {}))

    def waits(micro: int) -> int:
        folder = tmp_path / f"micro{micro}"
        folder.mkdir()
        cfg = config.load(small_config(folder, train={"max_steps": 1},
                                       batch={"global_size": 8, "micro_size": micro},
                                       data={"num_workers": 0}))  # fmt: skip
        with CountWaits() as mode:
            run(cfg, Dist())
        return mode.waits

    assert waits(8) == waits(2)  # accumulation 1 and 4: the same number of host waits


def test_lora_backward_computes_no_gradient_of_a_frozen_weight():
    """LoRA's frozen weights cost their forward and the input gradient, nothing more: no matrix
    product in forward or backward yields a tensor shaped like a frozen weight (the base
    projections, the LM head), and no frozen weight ends with a gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lockstep.config import FinetuneConfig, LoraSettings
    from lockstep.model.adapters import apply

    model = apply(
        FinetuneConfig(method="lora", lora=LoraSettings(r=4)),
        load_model(ModelConfig(), init_seed=3),
        init_seed=0,
    )
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert not [n for n, p in base.items() if p.requires_grad]
    frozen = {tuple(p.shape) for p in base.values() if p.dim() == 2}
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.mm.out, torch.ops.aten.addmm_.default}  # fmt: skip

    class Products(TorchDispatchMode):
        shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in products:
                Products.shapes.append(tuple(out.shape))
            return out

    with Products():
        CausalLMLoss(model, 16)(with_target_index(random_batch())).backward()
    assert len(Products.shapes) > 20  # the forward and backward of every projection were seen
    assert not [s for s in Products.shapes if s in frozen], frozen
    assert all(p.grad is None for p in base.values())
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
