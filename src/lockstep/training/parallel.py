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

from contextlib import AbstractContextManager, nullcontext

import torch

from lockstep.config import RunConfig
from lockstep.dist import Dist
from lockstep.model import adapters
from lockstep.model.load import DTYPES
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
    return torch.nn.parallel.DistributedDataParallel(engine, device_ids=device_ids)


def shard(cfg: RunConfig, d: Dist, engine: CausalLMLoss) -> torch.nn.Module:
    """FSDP2: each block its own unit (gathered just in time), the rest in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
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
    """Reduce gradients only after the last micro-batch of a step (accumulate locally before)."""
    if isinstance(engine, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if last else engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(last)
    return nullcontext()


def unwrap(engine: torch.nn.Module) -> CausalLMLoss:
    """The loss module under DDP (FSDP2 keeps the module itself)."""
    return getattr(engine, "module", engine)
