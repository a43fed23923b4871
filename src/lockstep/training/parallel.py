"""How the model runs on the devices: precision, recomputation, compilation, DDP or FSDP2.

Every speed and sharding switch is applied here, in one place, to a model that knows nothing of
them (the transformers model as loaded). The result is the module the loop calls, the trainee:
the objective's module around the model (training/objective.py), which takes a micro-batch and
returns its summed loss, under DDP or sharded by FSDP2.

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
from lockstep.training.objective import Objective


def mixed(cfg: RunConfig) -> bool:
    return cfg.model.dtype != "float32" and cfg.model.master_weights == "float32"


def autocast(cfg: RunConfig, d: Dist) -> AbstractContextManager:
    """Mixed precision under DDP (FSDP2 casts by its own policy instead)."""
    if mixed(cfg) and not shards_weights(cfg, d):
        return torch.autocast(d.device.type, dtype=DTYPES[cfg.model.dtype])
    return nullcontext()


def shards_weights(cfg: RunConfig, d: Dist) -> bool:
    """FSDP with more than one process: each rank holds a shard of every weight (one process
    holds everything: nothing to shard). Whether checkpoints are sharded is another question,
    answered by train.strategy alone (checkpoint.Saver.for_run)."""
    return cfg.train.strategy == "fsdp" and d.distributed


def prepare(
    cfg: RunConfig, d: Dist, model: torch.nn.Module, objective: Objective
) -> torch.nn.Module:
    """The trainee: recomputation, compiled blocks, the objective's module, FSDP2 sharding.

    DDP comes later (replicate), once the ranks have compared their weights: DDP overwrites
    every rank's weights with rank 0's, which would hide a rank that built a different model.
    """
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        for block in adapters.blocks(model):
            block.compile()
    trainee = objective.module(model)
    return shard(cfg, d, trainee, model) if shards_weights(cfg, d) else trainee


def replicate(cfg: RunConfig, d: Dist, trainee: torch.nn.Module) -> torch.nn.Module:
    """DDP for a model every rank holds whole (after the ranks agreed on their weights)."""
    if not d.distributed or shards_weights(cfg, d):
        return trainee
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    # gradients live in DDP's communication buckets: no second, full-size copy of them
    return torch.nn.parallel.DistributedDataParallel(
        trainee, device_ids=device_ids, gradient_as_bucket_view=True
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
    return torch.device("cpu") if shards_weights(cfg, d) else d.device


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


def shard(
    cfg: RunConfig, d: Dist, trainee: torch.nn.Module, model: torch.nn.Module
) -> torch.nn.Module:
    """FSDP2: each block of `model` its own unit (gathered just in time), the rest in the root
    unit, `trainee` (the objective's module holding `model`).

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
    for block in adapters.blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(trainee, mesh=mesh, mp_policy=policy)
    return trainee


def gradient_sync(trainee: torch.nn.Module, last: bool) -> AbstractContextManager:
    """How gradients of a micro-batch are reduced.

    DDP: only after the last micro-batch of a step (accumulated locally before).
    FSDP: reduce-scattered after every micro-batch, so each rank only ever holds its shard of
    the gradients (deferring it would keep full-size unsharded gradients until the last
    micro-batch); the price is one reduce-scatter per micro-batch instead of per step. Over
    several nodes (HSDP) the all-reduce across nodes waits for the last micro-batch.
    """
    if isinstance(trainee, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if last else trainee.no_sync()
    if hasattr(trainee, "set_requires_all_reduce"):  # FSDP2
        trainee.set_requires_all_reduce(last)
    return nullcontext()


def unwrap(trainee: torch.nn.Module) -> torch.nn.Module:
    """The objective's module under DDP (FSDP2 keeps the module itself)."""
    return getattr(trainee, "module", trainee)
