"""FSDP2 on CPU (gloo, 2 processes): DDP's numbers, sharded checkpoints that resume exactly,
half the memory, an orderly end; the decisions a GPU or several nodes would take."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_S, ROOT, run_cli, small_config
from safetensors.torch import load_file

from lockstep import config as config_mod
from lockstep.dist import Dist
from lockstep.errors import ConfigError
from lockstep.model.attention import Choice
from lockstep.report.metrics import read
from lockstep.training import build, parallel

SDPA = Choice("sdpa", "set by the test")  # one sample per row: no varlen


def train_rows(out):
    return [r for r in read(out / "metrics.jsonl") if "loss" in r]


slow = pytest.mark.slow  # torchrun runs: the README's test command and CI run them

STEPS = 10
SECTIONS = {
    "train": {"max_steps": STEPS},
    "checkpoint": {"every_steps": 5},
    "data": {"val_fraction": 0.05},  # eval_loss every 5 steps: a sharded forward on every rank
    "eval": {"every_steps": 5},
}


def train(folder, *args: str, ok: bool = True):
    folder.mkdir(exist_ok=True)
    cfg = small_config(folder, **SECTIONS)
    res = run_cli("train", str(cfg), *args)
    if ok:
        assert res.returncode == 0, res.stderr
    return res, folder / "out"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _, ddp = train(tmp / "ddp", "--nproc-per-node", "2", "train.strategy=ddp")
    _, fsdp = train(tmp / "fsdp", "--nproc-per-node", "2", "train.strategy=fsdp")
    return {"ddp": ddp, "fsdp": fsdp, "tmp": tmp}


@slow
def test_ddp_and_fsdp_give_the_same_losses(runs):
    ddp_eval = [r["eval_loss"] for r in read(runs["ddp"] / "metrics.jsonl") if "eval_loss" in r]
    fsdp_eval = [r["eval_loss"] for r in read(runs["fsdp"] / "metrics.jsonl") if "eval_loss" in r]
    assert len(ddp_eval) == 2
    assert fsdp_eval == pytest.approx(ddp_eval, rel=1e-4)
    ddp, fsdp = train_rows(runs["ddp"]), train_rows(runs["fsdp"])
    assert [r["batch_sha"] for r in fsdp] == [r["batch_sha"] for r in ddp]
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], rel=1e-4)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in ddp], rel=1e-3)
    assert ddp[-1]["loss"] < ddp[0]["loss"]


@slow
def test_fsdp_checkpoints_are_sharded_and_the_final_model_is_whole(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000005"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one file per rank
    ddp = load_file(runs["ddp"] / "final" / "model.safetensors")
    fsdp = load_file(runs["fsdp"] / "final" / "model.safetensors")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-3, atol=1e-4, msg=name)


@slow
def test_sharded_checkpoint_resumes_exactly(runs):
    folder = runs["tmp"] / "interrupted"
    args = ("--nproc-per-node", "2", "train.strategy=fsdp")
    res, out = train(folder, *args, "testing.fail_at_step=8", ok=False)
    assert res.returncode != 0 and "injected failure at step 8" in res.stderr
    res, out = train(folder, *args)
    assert "resuming from" in res.stderr and "step-00000005" in res.stderr
    reference, resumed = train_rows(runs["fsdp"]), train_rows(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "batch_sha"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    a = load_file(runs["fsdp"] / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_sharded_checkpoint_resumes_on_one_process_and_exports(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000005"
    one = runs["tmp"] / "one"
    res, out = train(one, "train.strategy=fsdp", f"checkpoint.resume={ckpt}")
    reference, resumed = train_rows(runs["fsdp"]), train_rows(out)
    assert [r["step"] for r in resumed] == list(range(6, STEPS + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference[5:]],
                                                         rel=1e-4)  # fmt: skip
    exported = runs["tmp"] / "exported"
    res = run_cli("export", str(ckpt), "--out", str(exported))
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    assert sum(p.numel() for p in model.parameters()) > 3_000_000


@slow
def test_a_ddp_checkpoint_is_refused_by_a_sharded_run_in_words(runs, tmp_path):
    ckpt = runs["ddp"] / "checkpoints" / "step-00000005"
    res, _ = train(tmp_path / "x", "--nproc-per-node", "2", "train.strategy=fsdp",
                   f"checkpoint.resume={ckpt}", ok=False)  # fmt: skip
    assert res.returncode != 0
    assert "train.strategy=ddp" in res.stderr and "sharded" in res.stderr


@slow
def test_lora_under_fsdp_trains_the_same_adapter_as_ddp(tmp_path):
    adapters = {}
    for strategy in ("ddp", "fsdp"):
        _, out = train(tmp_path / strategy, "--nproc-per-node", "2", f"train.strategy={strategy}",
                       "finetune.method=lora", "train.max_steps=4", "eval.every_steps=null",
                       "data.val_fraction=0")  # fmt: skip
        adapters[strategy] = load_file(out / "final" / "adapter_model.safetensors")
    ddp, fsdp = adapters["ddp"], adapters["fsdp"]
    assert ddp.keys() == fsdp.keys() and any("lora_B" in k for k in ddp)
    assert any(ddp[k].abs().max() > 0 for k in ddp if "lora_B" in k)  # B moved off zero
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------- decisions (no GPU, no nodes)


def fsdp_config(tmp_path, **sections):
    return config_mod.load(small_config(tmp_path, **sections), ["train.strategy=fsdp"])


def test_one_node_shards_flat_and_several_nodes_use_hsdp():
    assert parallel.mesh_shape(2, 2) == (2,)  # one node of 2
    assert parallel.mesh_shape(8, 8) == (8,)
    assert parallel.mesh_shape(16, 8) == (2, 8)  # 2 nodes of 8: shard in a node, replicate across
    assert parallel.mesh_shape(2, 1) == (2, 1)  # 2 nodes of 1 process
    assert parallel.mesh_shape(6, 4) == (6,)  # not whole nodes: flat
    assert Dist(world_size=16, local_world_size=8).per_node == 8
    assert Dist(world_size=4).per_node == 4  # unknown: one node


def test_fsdp_on_a_torch_without_fsdp2_is_refused_in_one_line(tmp_path):
    cfg = fsdp_config(tmp_path)
    with pytest.raises(ConfigError) as err:
        parallel.check_supported(cfg, "2.5.1+cu124")
    assert str(err.value).count("\n") == 0
    assert "train.strategy=fsdp needs torch >= 2.6" in str(err.value)
    assert "2.5.1+cu124" in str(err.value) and "train.strategy=ddp" in str(err.value)
    parallel.check_supported(cfg, "2.6.0")
    parallel.check_supported(cfg, "2.11.0+cu128")
    ddp = cfg.model_copy(update={"train": cfg.train.model_copy(update={"strategy": "ddp"})})
    parallel.check_supported(ddp, "2.4.0")
    # the declared floor is the one FSDP needs
    text = (ROOT / "pyproject.toml").read_text()
    floor = ".".join(map(str, parallel.FSDP_MIN_TORCH))
    assert f'"torch>={floor}"' in text


def test_fsdp_builds_the_model_on_the_cpu_and_shards_it_from_there(tmp_path):
    """No rank puts the whole model on its GPU: it stays on the CPU until fully_shard moves each
    unit's shard to the device (a CUDA rank is described here; nothing is moved to it)."""
    cfg = fsdp_config(tmp_path)
    gpu_rank = Dist(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    assert parallel.load_device(cfg, gpu_rank) == torch.device("cpu")
    model = build.build_model(cfg, 7, gpu_rank, SDPA)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    one = Dist(device=torch.device("cuda", 0))  # one process: nothing to shard, on its device
    assert parallel.load_device(cfg, one) == torch.device("cuda", 0)


def test_weights_checksum_sees_one_changed_value_in_a_weight_larger_than_a_chunk():
    import copy

    from lockstep.dist import CHECKSUM_CHUNK, params_checksum

    a = torch.nn.Linear(4100, 4100, bias=False)
    assert a.weight.numel() > CHECKSUM_CHUNK  # summed in more than one piece
    b = copy.deepcopy(a)
    assert params_checksum(a) == params_checksum(b)
    with torch.no_grad():
        b.weight[-1, -1] += 1e-3
    assert params_checksum(a) != params_checksum(b)


# ---------------------------------------------------------------- memory (torchrun, 2 processes)


def probe(tmp_path, name: str, *overrides: str, mode: str = "hold") -> list[dict]:
    """Run tests/fsdp_probe.py MODE on 2 processes; each rank's report."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = small_config(folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_probe.py"), mode, str(cfg), str(folder), *overrides]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]


@slow
def test_fsdp_holds_half_of_ddps_weights_and_gradients_with_accumulation(tmp_path):
    ddp = probe(tmp_path, "ddp", "train.strategy=ddp")
    fsdp = probe(tmp_path, "fsdp", "train.strategy=fsdp")
    whole = ddp[0]["whole_model_bytes"]
    for rank in range(2):
        ddp_peak = max(ddp[rank]["held_after_backward"])
        fsdp_peak = max(fsdp[rank]["held_after_backward"])
        assert ddp_peak >= 1.95 * whole  # every weight and its gradient
        # half of each (2 ranks), also between micro-batches: no full-size gradient is kept
        assert fsdp_peak <= 0.55 * ddp_peak, (rank, fsdp_peak / ddp_peak)
    # a full fine-tune's final/ needs every weight: gathered on rank 0
    assert "model.embed_tokens.weight" in fsdp[0]["final_keys"]


@slow
def test_fsdp_lora_gathers_only_the_adapter_for_final(tmp_path):
    ranks = probe(tmp_path, "lora", "train.strategy=fsdp", "finetune.method=lora")
    keys = ranks[0]["final_keys"]
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]


# ---------------------------------------------------------------- LoRA / freeze: resume, export


def start(cfg, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lockstep", "train", str(cfg), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_9_job(cfg) -> list[int]:
    """SIGKILL every process of the run of `cfg` (lockstep, torchrun and each rank: torchrun
    starts the ranks in sessions of their own), as if the machine died."""
    found = []  # every process first: a killed parent takes its children down with it
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(cfg).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # gone already, with its parent
    return found


def wait_for_step(out, step: int, proc: subprocess.Popen, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        rows = [r for r in read(path) if "loss" in r] if path.is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


FROZEN = {
    "lora": ("finetune.method=lora",),
    "freeze": ("finetune.method=freeze", "finetune.freeze.trainable_layers=2"),
}


@slow
@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_fsdp_with_frozen_weights_resumes_exactly_after_kill_9_and_exports(tmp_path, method):
    sections = {"train": {"max_steps": 12, "strategy": "fsdp"}, "checkpoint": {"every_steps": 4}}
    args = ("--nproc-per-node", "2", *FROZEN[method])
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    ref_cfg = small_config(tmp_path / "ref", **sections)
    res = run_cli("train", str(ref_cfg), *args)
    assert res.returncode == 0, res.stderr
    cfg = small_config(tmp_path / "cut", **sections)
    proc = start(cfg, *args)
    wait_for_step(tmp_path / "cut" / "out", 5, proc)
    assert len(kill_9_job(cfg)) >= 3  # lockstep, torchrun, 2 ranks
    proc.communicate()
    assert not (tmp_path / "cut" / "out" / "final").exists()
    res = run_cli("train", str(cfg), *args)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "Traceback" not in res.stderr
    ref, out = tmp_path / "ref" / "out", tmp_path / "cut" / "out"
    reference, resumed = train_rows(ref), train_rows(out)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for key in ("loss", "grad_norm", "batch_sha"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(ref / "final" / weights), load_file(out / "final" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    exported = tmp_path / "exported"
    res = run_cli("export", str(out), "--out", str(exported))
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 20, 30, 40, 2]])
    merged = AutoModelForCausalLM.from_pretrained(exported)
    if method == "lora":
        from peft import PeftModel

        final = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"),
                                          out / "final")  # fmt: skip
    else:
        final = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, final(ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- lockstep checks, teardown


@slow
def test_fsdp_sees_a_rank_that_built_different_weights(tmp_path):
    cfg = small_config(tmp_path, testing={"desync": "seed", "desync_rank": 1},
                       launch={"timeout_s": 30})  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc-per-node", "2", "train.strategy=fsdp")
    assert res.returncode != 0
    table = res.stderr[res.stderr.index("ranks are out of lockstep") :]
    assert "  params_checksum " in table and "| rank 1: " in table


@slow
def test_every_rank_waits_for_rank_0s_final_writes(tmp_path):
    """No rank tears its process group down while rank 0 still writes final/ and loss.png."""
    ranks = probe(tmp_path, "end", "train.strategy=fsdp", "train.max_steps=2", mode="end")
    assert [r["code"] for r in ranks] == [0, 0]
    written = (tmp_path / "end" / "out" / "loss.png").stat().st_mtime  # after final/
    assert ranks[1]["returned"] >= written, written - ranks[1]["returned"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
def test_two_nodes_train_as_hsdp_with_ddps_numbers(runs):
    """Two "nodes" of one process each (same machine): a 2-D mesh, replicated across nodes,
    with 2 accumulated micro-batches (the all-reduce across nodes waits for the last)."""
    folder = runs["tmp"] / "hsdp"
    folder.mkdir()
    cfg = small_config(folder, **SECTIONS)
    port = str(_free_port())
    args = ("--nnodes", "2", "--nproc-per-node", "1", "--master-port", port,
            "train.strategy=fsdp", "batch.micro_size=2")  # fmt: skip
    nodes = [start(cfg, *args, "--node-rank", str(n)) for n in range(2)]
    results = [node.communicate(timeout=HANG_S) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-3000:]
    assert "HSDP over 2 nodes: sharded within a node (1 process(es))" in results[0][1]
    ddp, hsdp = train_rows(runs["ddp"]), train_rows(folder / "out")
    assert [r["batch_sha"] for r in hsdp] == [r["batch_sha"] for r in ddp]
    assert [r["loss"] for r in hsdp] == pytest.approx([r["loss"] for r in ddp], rel=1e-4)
    a = load_file(runs["ddp"] / "final" / "model.safetensors")
    b = load_file(folder / "out" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
