"""FSDP2 checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards.

A sharded checkpoint (CHECKPOINT/sharded/) holds the trainable weights and the optimizer state
under their parameter names, so it loads into any number of processes, sharded or not: DCP
reshards on load. Frozen weights (the base of a LoRA or freeze run) are not in it: they are
rebuilt from model.path (or the seed) exactly as they were, so loading fills only the trainable
ones. The final model is gathered into one Hugging Face folder on rank 0.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lockstep.errors import CheckpointError, first_line, reason

FOLDER = "sharded"


def _options(full: bool = False):
    """Trainable parameters only; loading leaves the frozen ones as built (strict=False: a frozen
    parameter is absent by design, and a missing trainable one still fails in dcp.load)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, strict=False
    )


NAMES = "model"
"""state.json's `sharded_names` for a checkpoint whose keys are the language model's own
parameter names (what `save` writes). Checkpoints without it (lockstep 0.1.0) named them under
the loss module that held the model as `.model`: `named` reads those too."""


class _Under(torch.nn.Module):
    """The language model under one attribute, `model`: the names 0.1.0's checkpoints hold."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def named(model: torch.nn.Module, names: str | None) -> torch.nn.Module:
    """The module whose parameter names are the keys of a checkpoint written with `names`."""
    return model if names == NAMES else _Under(model)


def trainable(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` less what does not train: ignore_frozen_params keeps a frozen weight that is
    tied to another (a LoRA run's output head, tied to the embeddings: vocabulary x hidden
    size in every checkpoint), and a trained tied weight is kept once, under its first name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of `model`'s trainable weights and their optimizer state
    into path/sharded, keyed by the model's own parameter names (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": trainable(model, model_state), "optim": optim_state}
    dcp.save(state, checkpoint_id=str(path / FOLDER))


def load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: str | None
) -> None:
    """Read path/sharded into this rank's shards of `model` and its optimizer state (any world
    size, resharded as needed); `names`: the checkpoint's `sharded_names` (see NAMES)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    keyed = named(model, names)
    model_state, optim_state = get_state_dict(keyed, optimizer, options=_options())
    state = {"model": trainable(keyed, model_state), "optim": optim_state}
    _read(path, state)
    set_state_dict(
        keyed, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=_options(),
    )  # fmt: skip


def load_weights(path: Path, model: torch.nn.Module, names: str | None) -> int:
    """The trained weights of a sharded checkpoint into a whole model (one process, export)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    keyed = named(model, names)
    state = {"model": trainable(keyed, get_model_state_dict(keyed, options=_options()))}
    _read(path, state)
    set_model_state_dict(keyed, state["model"], options=_options())
    return len(state["model"])


def _read(path: Path, state: dict) -> None:
    """Fill `state` (resharded to this rank's shards) from path/sharded, errors in words; the
    metadata is checked first (check_metadata), since DCP reads it with pickle."""
    import torch.distributed.checkpoint as dcp

    check_metadata(path)

    try:
        dcp.load(state, checkpoint_id=str(path / FOLDER))
    except Exception as e:  # DCP raises CheckpointException and others for a damaged folder
        raise CheckpointError(f"cannot load sharded checkpoint {path}: {first_line(e)}") from None


def is_sharded(path: Path) -> bool:
    return (path / FOLDER).is_dir()


def full_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The language model's weights gathered on rank 0 (empty elsewhere); collective.

    `trainable_only`: just the trained parameters (a LoRA adapter: the frozen base is neither
    gathered nor copied to the CPU); otherwise every weight (full and freeze runs save the model).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    state = get_model_state_dict(model, options=options)
    seen, tied = set(), set()  # tied weights (embeddings = LM head) are saved once
    for name, p in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(p) in seen else seen.add(id(p)))
    return {k: v for k, v in state.items() if k not in tied}


# ---------------------------------------------------------------- sharded metadata

# what a DCP `.metadata` pickle may name: its metadata classes and the torch types they hold
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused, not imported."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def read_metadata(path: Path) -> Any:
    """The DCP metadata of checkpoint `path` (path/sharded/.metadata), read without running code.

    DCP itself reads this file with pickle.load, which can run any code a crafted file names:
    lockstep reads it first with an unpickler that allows only DCP's metadata classes, and
    refuses the checkpoint in one line otherwise.
    """
    meta = path / FOLDER / ".metadata"
    try:
        with meta.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"cannot read {meta}: {reason(e)}") from None
    except Exception as e:  # UnpicklingError, EOFError, and what a damaged pickle raises
        raise CheckpointError(
            f"refusing sharded checkpoint {path}: {meta} is not plain DCP metadata "
            f"({first_line(e)}); it was not written by lockstep, or is damaged"
        ) from None


def missing_files(path: Path) -> list[str]:
    """The shard files that checkpoint `path`'s DCP metadata names and its folder lacks."""
    folder = path / FOLDER
    if not (folder / ".metadata").is_file():
        return [".metadata"]
    storage = getattr(read_metadata(path), "storage_data", None) or {}
    files = sorted({str(getattr(info, "relative_path", "")) for info in storage.values()})
    return [f for f in files if not f or not (folder / f).is_file()]


def check_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint whose metadata is not plain DCP metadata (before DCP reads
    it with pickle) or that lacks a shard file its metadata names."""
    missing = missing_files(path)
    if missing:
        raise CheckpointError(
            f"sharded checkpoint {path} lacks {', '.join(missing[:4])} in {FOLDER}/: "
            "it is incomplete (written to a disk the other ranks could not see?)"
        )
