"""How the model runs on the devices: precision, recomputation, compilation, DDP or FSDP2.

Every speed and sharding switch is applied here, in one place, to a model that knows nothing of
them (the transformers model as loaded). The result is the module the loop calls: it takes a
micro-batch and returns its summed cross entropy (training/loss.py).

Precision (model.dtype, model.master_weights):
- float32: everything in float32.
- bfloat16 + master float32 (mixed): weights and optimizer state stay float32; forward and
  backward run in bfloat16 (autocast with DDP; FSDP2's MixedPrecisionPolicy with FSDP, which
  also reduces gradients in float32).
- bfloat16 + master same (pure): weights, gradients and optimizer state in bfloat16. Half the
  memory of mixed, less precise updates.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext

import torch

from lockstep.config import RunConfig
from lockstep.dist import Dist
from lockstep.errors import ConfigError
from lockstep.model import adapters
from lockstep.model.load import DTYPES
from lockstep.report import log as logmod
from lockstep.training.loss import CausalLMLoss


def mixed(cfg: RunConfig) -> bool:
    return cfg.model.dtype != "float32" and cfg.model.master_weights == "float32"


def autocast(cfg: RunConfig, d: Dist) -> AbstractContextManager:
    """Mixed precision under DDP (FSDP2 casts by its own policy instead)."""
    if mixed(cfg) and not sharded(cfg, d):
        return torch.autocast(d.device.type, dtype=DTYPES[cfg.model.dtype])
    return nullcontext()


def sharded(cfg: RunConfig, d: Dist) -> bool:
    """FSDP with more than one process (one process holds everything: nothing to shard)."""
    return cfg.train.strategy == "fsdp" and d.distributed


def prepare(cfg: RunConfig, d: Dist, model: torch.nn.Module) -> torch.nn.Module:
    """The module that trains: recomputation, compiled blocks, the loss, FSDP2 sharding.

    DDP comes later (replicate), once the ranks have compared their weights: DDP overwrites
    every rank's weights with rank 0's, which would hide a rank that built a different model.
    """
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        for block in adapters.blocks(model):
            block.compile()
    engine = CausalLMLoss(model, cfg.train.loss_chunk)
    return shard(cfg, d, engine) if sharded(cfg, d) else engine


def replicate(cfg: RunConfig, d: Dist, engine: torch.nn.Module) -> torch.nn.Module:
    """DDP for a model every rank holds whole (after the ranks agreed on their weights)."""
    if not d.distributed or sharded(cfg, d):
        return engine
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    # gradients live in DDP's communication buckets: no second, full-size copy of them
    return torch.nn.parallel.DistributedDataParallel(
        engine, device_ids=device_ids, gradient_as_bucket_view=True
    )


FSDP_MIN_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard (FSDP2) is public from 2.6


def check_supported(cfg: RunConfig, torch_version: str | None = None) -> None:
    """Fail before any work when train.strategy=fsdp needs a newer torch than this one."""
    version = torch_version or torch.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    if cfg.train.strategy != "fsdp" or (
        found and tuple(map(int, found.groups())) >= FSDP_MIN_TORCH
    ):
        return
    need = ".".join(map(str, FSDP_MIN_TORCH))
    raise ConfigError(
        f"train.strategy=fsdp needs torch >= {need} (FSDP2's fully_shard); this is torch "
        f"{version}. Upgrade torch, or set train.strategy=ddp"
    )


def load_device(cfg: RunConfig, d: Dist) -> torch.device:
    """Where the model is built: on the CPU when FSDP will shard it (fully_shard then moves
    each unit's shards to the device, one unit at a time: no rank ever holds the whole model
    on its device), else on this rank's device."""
    return torch.device("cpu") if sharded(cfg, d) else d.device


def mesh_shape(world_size: int, per_node: int) -> tuple[int, ...]:
    """The FSDP device mesh: (world,) on one node; (nodes, per_node) over several nodes.

    Over several nodes, HSDP: parameters are sharded within a node (fast links) and replicated
    across nodes, so the all-gathers of every forward and backward never cross the network;
    only the gradient all-reduce does, once per step. A world that is not whole nodes of
    `per_node` processes keeps the flat mesh.
    """
    if 0 < per_node < world_size and world_size % per_node == 0:
        return (world_size // per_node, per_node)
    return (world_size,)


def shard(cfg: RunConfig, d: Dist, engine: CausalLMLoss) -> torch.nn.Module:
    """FSDP2: each block its own unit (gathered just in time), the rest in the root unit.

    The model comes in on the CPU (load_device); each fully_shard call moves its unit to the
    device and keeps only this rank's shard there.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = mesh_shape(d.world_size, d.per_node)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(d.device.type, shape, mesh_dim_names=names)
    if len(shape) == 2:
        logmod.get().info(
            f"FSDP: HSDP over {shape[0]} nodes: sharded within a node ({shape[1]} "
            "process(es)), replicated across nodes"
        )
    else:
        logmod.get().info(f"FSDP: sharded over {shape[0]} processes")
    if mixed(cfg):
        policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[cfg.model.dtype], reduce_dtype=torch.float32
        )
    else:
        policy = MixedPrecisionPolicy()
    for block in adapters.blocks(engine.model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(engine, mesh=mesh, mp_policy=policy)
    return engine


def gradient_sync(engine: torch.nn.Module, last: bool) -> AbstractContextManager:
    """How gradients of a micro-batch are reduced.

    DDP: only after the last micro-batch of a step (accumulated locally before).
    FSDP: reduce-scattered after every micro-batch, so each rank only ever holds its shard of
    the gradients (deferring it would keep full-size unsharded gradients until the last
    micro-batch); the price is one reduce-scatter per micro-batch instead of per step. Over
    several nodes (HSDP) the all-reduce across nodes waits for the last micro-batch.
    """
    if isinstance(engine, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if last else engine.no_sync()
    if hasattr(engine, "set_requires_all_reduce"):  # FSDP2
        engine.set_requires_all_reduce(last)
    return nullcontext()


def unwrap(engine: torch.nn.Module) -> CausalLMLoss:
    """The loss module under DDP (FSDP2 keeps the module itself)."""
    return getattr(engine, "module", engine)
