"""Checkpoints that never lose a run: atomic save, retention, exact resume.

Layout: OUTPUT/checkpoints/step-00000100/
  model.safetensors      trainable parameters (all of them for full fine-tuning)
  optimizer.pt           optimizer state  (tensors + numbers: loaded with weights_only=True)
  sharded/               instead of the two above with train.strategy=fsdp: weights and
                         optimizer state as every rank's shards (training/sharded.py)
  scheduler.pt           scheduler state  (idem)
  rng-rank-R.pt          python, numpy, torch and CUDA generator states of rank R
  state.json             step, epoch, samples consumed, seed, config hash, world size, version,
                         data fingerprint, CPU threads, the losses since the last logged step
                         (log_window); `sharded_names` when sharded/ is keyed by the language
                         model's own parameter names (training/sharded.py)
  config.yaml            the resolved config of the run that wrote it
  tokenizer/             the run's tokenizer, with the chat template it trained with
  COMPLETE               written last; a folder without it does not exist for any reader

The whole protocol lives here: `prepare_resume` (every rank, before anything is built) and
`Saver.save` (every rank, at each checkpoint step). A checkpoint is written into
`.tmp-step-...`: every rank writes its RNG state (and, with train.strategy=fsdp, its shards),
all ranks meet, then rank 0 writes the shared files, flushes, checks that every rank's files are
there, marks it COMPLETE and renames it into place while the others wait (as long as that
takes); older checkpoints are deleted only after the new one is complete. Nothing loaded can run code: tensors load with weights_only=True onto the CPU (the
optimizer moves its state to its parameters' device), and a sharded checkpoint's `.metadata`
pickle is read with an unpickler that knows only DCP's metadata classes before DCP reads it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from lockstep import config as config_mod
from lockstep import config_files
from lockstep.config import RunConfig
from lockstep.data.order import Order
from lockstep.dist import Dist, main_first
from lockstep.errors import CheckpointError, first_line, reason
from lockstep.report import log as logmod
from lockstep.training import sharded

COMPLETE = "COMPLETE"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
OWN_NAME = re.compile(r"(\.tmp-)?step-\d{8,}")  # the folders lockstep writes, and nothing else
# fields whose change alters the data order or the model: resuming across them is refused
GUARDED = (
    "seed",
    "model.path",
    "model.dtype",
    "model.master_weights",
    "finetune",
    "preference",
    "data.train",
    "data.max_length",
    "data.packing",
    "data.template",
    "data.chat_template",
    "data.template_kwargs",
    "data.train_on",
    "data.multi_turn",
    "data.reasoning",
    "batch.global_size",
)


def folder_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under OUTPUT/checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def clean_incomplete(root: Path) -> list[Path]:
    """Remove lockstep's own leftovers of interrupted saves: `.tmp-step-N` folders and `step-N`
    folders without a COMPLETE marker. Anything else under OUTPUT/checkpoints (another tool's
    folders, a user's notes) is left alone. Returns what was removed, for the log."""
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if not (p.is_dir() and OWN_NAME.fullmatch(p.name)):
                continue
            if p.name.startswith(TMP_PREFIX) or not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    np_name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


@dataclass
class Saver:
    """Writes the checkpoints of one run: every rank calls `save`; rank 0 writes the shared files.

    `sharded`: the checkpoint holds DCP shards (train.strategy=fsdp, any world size) instead of
    model.safetensors + optimizer.pt, decided once for the run (`for_run`).
    """

    root: Path
    keep_last: int | None
    rank: int
    tokenizer: Any = None  # saved into every checkpoint: its chat template is the trained one
    world: int = 1  # ranks that write their files into each checkpoint
    sharded: bool = False
    dist: Dist | None = None  # the run's processes (None: this one alone)

    @classmethod
    def for_run(cls, cfg: RunConfig, d: Dist, tokenizer: Any) -> Saver:
        return cls(
            root=Path(cfg.output_dir) / "checkpoints", keep_last=cfg.checkpoint.keep_last,
            rank=d.rank, tokenizer=tokenizer, world=d.world_size,
            sharded=cfg.train.strategy == "fsdp", dist=d,
        )  # fmt: skip

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: Any, state: dict[str, Any], cfg: RunConfig,
    ) -> Path:  # fmt: skip
        """Every rank: checkpoint `step` of `model` (the language model: its trainable weights,
        or this rank's shards of them), `optimizer`, `scheduler` and `state` (state.json, see
        run_state). Returns the complete checkpoint's folder."""
        d = self.dist or Dist()
        self.write_rank_files(step)
        if self.sharded:
            self.write_sharded(step, model, optimizer)
        if d.distributed:
            tdist.barrier()  # every rank's files are written before rank 0 checks them
        path = self.root / folder_name(step)
        with main_first(d):  # the others wait while rank 0 completes the folder
            if d.is_main:
                state = {**state, "world_size": self.world}
                if self.sharded:
                    state["sharded_names"] = sharded.NAMES
                path = self.write_shared(step, model, optimizer, scheduler, state, cfg)
        return path

    def tmp_dir(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}{folder_name(step)}"

    def write_rank_files(self, step: int) -> None:
        """Each rank's own part (its RNG state), written before rank 0 completes the folder."""
        tmp = self.tmp_dir(step)
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), tmp / f"rng-rank-{self.rank}.pt")
        except Exception as e:  # OSError, or torch's own error for a short write
            why = why_not_written(e, tmp)
            raise CheckpointError(f"cannot write checkpoint into {tmp}: {why}") from None

    def write_sharded(self, step: int, model: torch.nn.Module, optimizer) -> None:
        """FSDP: every rank writes its shards of the weights and optimizer state (collective)."""
        tmp = self.tmp_dir(step)
        try:
            sharded.save(tmp, model, optimizer)
        except Exception as e:  # OSError, or DCP's own wrapper of it
            why = why_not_written(e, tmp)
            raise CheckpointError(f"cannot write sharded checkpoint into {tmp}: {why}") from None

    def write_shared(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: dict[str, Any],
        cfg: RunConfig,
    ) -> Path:
        """Rank 0: weights, optimizer, scheduler, state, marker, rename, retention."""
        tmp, final = self.tmp_dir(step), self.root / folder_name(step)
        self._check_every_rank_wrote(tmp, final)
        try:
            if not self.sharded:
                save_file(trainable_state(model), tmp / "model.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            config_mod.dump(cfg, tmp / "config.yaml")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
        except Exception as e:  # OSError, and safetensors' / torch's own errors for the same
            why = why_not_written(e, tmp)  # before the partial files are removed (free space)
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"cannot write checkpoint {final}: {why}; the previous checkpoint "
                "is untouched (free space or fix permissions, then resume)"
            ) from None
        self._retain()
        return final

    def _check_every_rank_wrote(self, tmp: Path, final: Path) -> None:
        """Before COMPLETE: rank 0 sees every rank's RNG file and (sharded) every shard file.

        On a multi-node job whose output_dir is node-local, each node writes its ranks' files
        to its own disk: rank 0 would mark complete a checkpoint that cannot be loaded."""
        missing = [
            f"rng-rank-{r}.pt"
            for r in range(self.world)
            if not (tmp / f"rng-rank-{r}.pt").is_file()
        ]
        if sharded.is_sharded(tmp):
            missing += [f"{sharded.FOLDER}/{f}" for f in sharded.missing_files(tmp)]
        if missing:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"cannot complete checkpoint {final}: rank 0 does not see "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} written by the "
                "other ranks. output_dir must be on storage shared by all nodes (a network "
                "file system), not a node-local disk"
            )

    def _retain(self) -> None:
        if not self.keep_last:
            return
        for old in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


LOW_SPACE = 16 << 20  # bytes: a write that failed with less free than this ran out of space


def why_not_written(e: BaseException, folder: Path, free: int | None = None) -> str:
    """Why a checkpoint write failed, in words. torch's zip writer loses the system's reason
    for a short write (`[enforce fail at inline_container.cc] unexpected pos`), so the space
    left (`free`, measured in `folder` unless given) and the error number decide."""
    if free is None:
        try:
            free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        except OSError:
            free = None
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or (free is not None and free < LOW_SPACE):
        shown = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
        return f"no space left on device{shown}"
    if code == errno.EFBIG:
        return "file too large (a file-size limit: see ulimit -f)"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    text = reason(e)
    if "enforce fail" in text or "unexpected pos" in text:
        return "a file could not be written completely (disk full, a quota, or a file-size limit?)"
    return text


# ---------------------------------------------------------------- load


@dataclass
class Loaded:
    """A complete checkpoint found to resume from: its folder, state.json and config.yaml."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]


def prepare_resume(cfg: RunConfig, d: Dist) -> Loaded | None:
    """Every rank, before anything is built: the checkpoint this run resumes from (None: a new
    run), checked against the config. Rank 0 first removes the leftovers of interrupted saves
    and, for a new run with checkpoint.overwrite, an earlier run's checkpoints; the other ranks
    wait for it as long as that takes (deleting a large folder may outlast launch.timeout_s)."""
    root = Path(cfg.output_dir) / "checkpoints"
    with main_first(d):
        if d.is_main:
            for leftover in clean_incomplete(root):
                logmod.get().info(
                    f"removed an incomplete checkpoint (an interrupted save): {leftover}"
                )
    found = find_resume(cfg)
    loaded = read(found) if found else None
    if loaded:
        check_config_change(loaded, cfg)
    with main_first(d):
        if not loaded and cfg.checkpoint.overwrite and d.is_main:
            delete_all(root)
    return loaded


def delete_all(root: Path) -> None:
    """checkpoint.overwrite with resume=never: delete the earlier run's checkpoints, and say so."""
    found = complete_checkpoints(root)
    shutil.rmtree(root, ignore_errors=True)
    if found:
        logmod.get().warning(
            f"checkpoint.overwrite=true: deleted {len(found)} checkpoint(s) of an earlier run in "
            f"{root} (newest: {found[-1].name}); training from step 0"
        )


def run_state(
    cfg: RunConfig, order: Order, step: int, data_fingerprint: str, log_window: list[float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What state.json says of the run after `step` steps (Saver.save adds the world size and,
    for a sharded checkpoint, its key names); `extra`: more entries (the init_from adapter's
    digest, the trackers' run ids)."""
    from lockstep import __version__

    return {
        "step": step,
        "epoch": order.epoch_of(step),
        "samples_consumed": step * order.global_size,
        "seed": cfg.seed,
        "config_hash": config_mod.config_hash(cfg),
        "lockstep_version": __version__,
        "data_fingerprint": data_fingerprint,
        "log_window": list(log_window),
        "threads": torch.get_num_threads(),  # CPU results depend on it (bit-exact resume)
        **(extra or {}),
    }


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from, per checkpoint.resume (auto | never | a path)."""
    root = Path(cfg.output_dir) / "checkpoints"
    mode = cfg.checkpoint.resume
    if mode == "never":
        existing = complete_checkpoints(root)
        if existing and not cfg.checkpoint.overwrite:
            raise CheckpointError(
                f"{root} already holds {len(existing)} checkpoint(s) and checkpoint.resume=never: "
                "set checkpoint.resume=auto to continue that run, choose another output_dir, "
                "or set checkpoint.overwrite=true to delete them and start fresh"
            )
        return None
    if mode == "auto":
        existing = complete_checkpoints(root)
        return existing[-1] if existing else None
    path = Path(mode)
    if not (path / COMPLETE).is_file():
        why = "does not exist" if not path.exists() else f"has no {COMPLETE} marker (incomplete)"
        raise CheckpointError(f"checkpoint.resume: {path} {why}")
    return path


def read(path: Path) -> Loaded:
    """The state and config of a checkpoint; a damaged one is one line, with the way on."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, bad UTF-8
        raise CheckpointError(
            f"cannot read checkpoint {path}: state.json: {first_line(e)}"
            f"{earlier_checkpoint_hint(path)}"
        ) from None
    try:
        cfg = config_files.read_file(path / "config.yaml")
    except config_mod.ConfigError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line(e)}{earlier_checkpoint_hint(path)}"
        ) from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"cannot read checkpoint {path}: state.json has no step number"
            f"{earlier_checkpoint_hint(path)}"
        )
    return Loaded(path, state, cfg)


def log_window(loaded: Loaded | None) -> list[float]:
    """The losses of the steps after the last logged one, as the checkpoint saved them: the
    first row a resumed run logs averages the same steps as the run that was not stopped."""
    if loaded is None:
        return []
    return [float(x) for x in loaded.state.get("log_window", [])]


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    out = []
    for dotted in GUARDED:
        a, b = old, new
        for part in dotted.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            out.append((dotted, a, b))
    return out


def check_config_change(loaded: Loaded, cfg: RunConfig) -> None:
    """Refuse to resume across a change of data order or model, unless forced."""
    new = config_mod.to_dict(cfg)
    if new["seed"] is None:  # an agreed seed is inherited from the checkpoint
        new["seed"] = loaded.config.get("seed")
    try:  # a setting the writing version did not have yet counts as its default
        old = config_mod.to_dict(RunConfig.model_validate(loaded.config))
    except Exception:  # a config this version cannot read: compare what is there
        old = loaded.config
    changes = changed_fields(old, new)
    if changes and not cfg.checkpoint.resume_force:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changes)
        raise CheckpointError(
            f"cannot resume from {loaded.path}: the config changed in fields that change the "
            f"data order or the model:\n{lines}\n"
            "Revert them, start a new output_dir, or set checkpoint.resume_force=true."
        )


def check_data_change(loaded: Loaded, fingerprint: str, cfg: RunConfig) -> None:
    """Refuse to resume on samples other than those the checkpoint trained on (a data file,
    the chat template file, the tokenizer or lockstep's data processing changed), unless forced:
    the fields in GUARDED name settings, this catches what the settings point to."""
    old = loaded.state.get("data_fingerprint")
    if old and old != fingerprint and not cfg.checkpoint.resume_force:
        raise CheckpointError(
            f"cannot resume from {loaded.path}: the tokenised data is not what it trained on "
            f"(data fingerprint {old} -> {fingerprint}): a data file, the chat template, the "
            "tokenizer or lockstep's data processing changed. Restore them, start a new "
            "output_dir, or set checkpoint.resume_force=true."
        )


def check_init_from_change(loaded: Loaded, digest: str, cfg: RunConfig) -> None:
    """Refuse to resume when the finetune.lora.init_from adapter's files are not those the run
    started from (digest: adapters.init_from_digest), unless forced. The checkpoint holds the
    weights either way; the adapter is part of what the run is."""
    old = loaded.state.get("init_from_adapter", "")
    if digest and old and old != digest and not cfg.checkpoint.resume_force:
        raise CheckpointError(
            f"cannot resume from {loaded.path}: the adapter finetune.lora.init_from="
            f"{cfg.finetune.lora.init_from} changed since the run started from it (adapter "
            f"digest {old} -> {digest}). Restore it, start a new output_dir, or set "
            "checkpoint.resume_force=true."
        )


def thread_change(loaded: Loaded, threads: int, device: torch.device) -> str | None:
    """A warning when a CPU run resumes with another number of intra-op threads than wrote the
    checkpoint: CPU kernels split their sums by thread, so the losses then match the
    uninterrupted run only to rounding, not bit for bit."""
    saved = loaded.state.get("threads")
    if device.type != "cpu" or not isinstance(saved, int) or saved == threads:
        return None
    return (
        f"the checkpoint was written with {saved} CPU threads, this run uses {threads}: the "
        f"resumed run matches the uninterrupted one to rounding, not bit for bit (for that, "
        f"run with OMP_NUM_THREADS={saved})"
    )


def load_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copy the checkpoint's tensors into the model; every trainable parameter must be there."""
    try:
        tensors = load_file(path / "model.safetensors")
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(
            f"{path / 'model.safetensors'} is damaged or not a checkpoint file ({first_line(e)})"
        ) from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}, "
            f"unknown {unknown[:3]}"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return tensors


def load_trained(path: Path, model: torch.nn.Module) -> int:
    """The trained weights of checkpoint `path` into a whole model in one process (export), in
    either layout; the number of tensors loaded."""
    if sharded.is_sharded(path):
        return sharded.load_weights(path, model, read(path).state.get("sharded_names"))
    return len(load_weights(path, model))


def load_into(
    loaded: Loaded,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    params_sharded: bool = False,
) -> bool:
    """Restore weights, optimizer, scheduler and (if saved for this rank) RNG; True if RNG was.

    `model`: the language model (with its adapters); `params_sharded`: its parameters are FSDP
    shards (only a sharded checkpoint loads into them).
    """
    path = loaded.path
    if params_sharded and not sharded.is_sharded(path):
        raise CheckpointError(
            f"checkpoint {path} was written with train.strategy=ddp; FSDP on several processes "
            "loads only sharded checkpoints (written with train.strategy=fsdp). Resume this run "
            "with train.strategy=ddp, or on one process"
        )
    try:
        if sharded.is_sharded(path):
            sharded.load(path, model, optimizer, loaded.state.get("sharded_names"))
        else:
            load_weights(path, model)
            optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
        rng_file = path / f"rng-rank-{rank}.pt"
        if rng_file.is_file():
            set_rng_state(load_tensors(rng_file))
            return True
        return False
    except CheckpointError as e:
        raise CheckpointError(f"{e}{earlier_checkpoint_hint(path)}") from None
    except Exception as e:  # a state that does not fit the optimizer, scheduler or RNG
        raise CheckpointError(
            f"cannot load checkpoint {path}: {first_line(e)}{earlier_checkpoint_hint(path)}"
        ) from None


def load_tensors(path: Path) -> Any:
    """A torch.save'd file, tensors and plain values only, onto the CPU whatever device wrote it;
    a damaged or crafted file is one CheckpointError naming it.

    Every rank of a resume reads the same optimizer.pt: without map_location its CUDA tensors
    would all land on the GPU that saved them (cuda:0). From the CPU, Optimizer.load_state_dict
    moves the state onto each parameter's own device; RNG states are CPU tensors anyway.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # pickle, zip and torch errors alike: truncated, damaged or crafted
        raise CheckpointError(
            f"{path} is damaged or not a checkpoint file ({first_line(e)})"
        ) from None


def earlier_checkpoint_hint(path: Path) -> str:
    """How to go on when checkpoint `path` cannot be loaded: the previous complete one."""
    earlier = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
    if earlier:
        return f". To resume from the previous complete checkpoint: checkpoint.resume={earlier[-1]}"
    return (
        ". No earlier complete checkpoint: start over with checkpoint.resume=never "
        "checkpoint.overwrite=true"
    )
