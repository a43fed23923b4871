"""Building a run: everything training needs, settled on every rank before the first step.

`build` reads top to bottom as the run starts:
1. the checkpoint to resume from, if any (checkpoint.prepare_resume);
2. the seed every rank agrees on; the resolved config written to OUTPUT/config.yaml;
3. the samples (rank 0 tokenises, the others read its cache), the eval samples, the order;
4. the model, the objective's module around it, optimizer and scheduler, restored on a resume;
5. the ranks' fingerprint check, then DDP;
6. the micro-batch stream and the outputs (checkpoints, metrics, the progress bar).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lockstep import config as config_mod
from lockstep import trackers
from lockstep.config import DataConfig, RunConfig
from lockstep.data import cache, mixing, templates
from lockstep.data.dataset import Samples, describe
from lockstep.data.loader import micro_batches
from lockstep.data.order import Order
from lockstep.dist import (
    Dist,
    agree_seed,
    all_reduce_sum,
    check_lockstep,
    derive_seed,
    main_first,
    params_checksum,
)
from lockstep.model import adapters, attention
from lockstep.model.load import DTYPES, load_model, load_tokenizer
from lockstep.report import log as logmod
from lockstep.report.metrics import MetricsWriter, truncate_after
from lockstep.training import checkpoint, faults, parallel, reference
from lockstep.training.evaluate import eval_split
from lockstep.training.objective import objective as objective_of
from lockstep.training.optim import build_optimizer, build_scheduler
from lockstep.training.options import RunOptions
from lockstep.training.profile import Profile, out_of_reach
from lockstep.training.state import Layout, LogWindow, Run, fingerprint_fields


def build(cfg: RunConfig, d: Dist, opts: RunOptions) -> Run | None:
    """The run of `cfg` on this process, ready for its first step; None when the checkpoint to
    resume from ends the run and its final/ model exists (nothing to do)."""
    log = logmod.get()
    resumed = checkpoint.prepare_resume(cfg, d)
    cfg = with_agreed_seed(cfg, d, resumed)
    tokenizer = load_tokenizer(cfg.model, templates.configured(cfg.data))
    pairs = cfg.finetune.stage == "preference"
    samples = build_samples(cfg.data, d, tokenizer, "the training data", pairs)
    samples, eval_samples = eval_split(
        cfg,
        samples,
        cfg.seed,
        lambda data: build_samples(data, d, tokenizer, "the eval data", pairs),
    )
    adapter_sha = adapters.init_from_digest(cfg.finetune)
    if resumed:
        checkpoint.check_data_change(resumed, samples.fingerprint, cfg)
        checkpoint.check_init_from_change(resumed, adapter_sha, cfg)
    data_rank, data_world = opts.as_rank or (d.rank, d.world_size)
    inputs = faults.inject(cfg.testing, data_rank, faults.Inputs(cfg.seed, samples))
    cfg, samples = cfg.model_copy(update={"seed": inputs.seed}), inputs.samples
    objective = objective_of(cfg)
    lengths = objective.unit_lengths(samples) if cfg.data.group_by_length else None
    order = Order(
        cfg.seed, objective.units(samples), cfg.batch.global_size, cfg.batch.micro_size,
        data_world, lengths, mixing.of(cfg.data.train, mixing.unit_datasets(samples, pairs)),
    )  # fmt: skip
    steps = total_steps(cfg, order)
    if resumed and already_complete(resumed, steps, Path(cfg.output_dir), d):
        return None

    layout = choose_layout(cfg, d, samples)
    precompute = getattr(objective, "reference", None) == "precompute"
    # a resume restores the checkpoint's weights; the precomputed reference (computed, or found
    # by the starting weights' checksum) is of the starting model: the init_from adapter's
    model = build_model(cfg, cfg.seed, d, layout.attention, resumed is None or precompute)
    isolation = check_isolation(cfg, d, model, layout.attention) if layout.shared_rows else ""
    weights_sharded = parallel.shards_weights(cfg, d)
    # FSDP: this rank's own weights, summed before they become shards (see params_checksum)
    built = params_checksum(model) if weights_sharded else None
    starting = params_checksum(model, trainable_only=False) if precompute else None
    trainee = parallel.prepare(cfg, d, model, objective)  # FSDP shards `model` in place
    # the optimizer takes the parameters as FSDP registered them, before any forward pass
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, steps)
    if starting:  # before a checkpoint is loaded: the model is the starting one
        path = reference.table_path(cfg, samples, starting, layout.attention.name or "auto")
        table, how = reference.precomputed(
            cfg, d, trainee, objective, samples, tokenizer.pad_token_id, path, layout
        )
        objective = dataclasses.replace(objective, table=table)
        log.info(f"reference log-probabilities: {how}")
    start_step = restore(cfg, d, resumed, (model, optimizer, scheduler), data_rank, steps)
    log_plan(cfg, samples, order, steps, model, layout.padding_free)
    log.info(f"attention: {model.config._attn_implementation} ({layout.attention.reason}"
             f"{isolation})")  # fmt: skip
    weights = built or params_checksum(model)
    check_lockstep(
        fingerprint_fields(cfg, samples, order, weights, start_step, objective, adapter_sha),
        d, "after building",
    )  # fmt: skip
    trainee = parallel.replicate(cfg, d, trainee)

    batches = micro_batches(
        samples, order, data_rank, start_step, steps, tokenizer.pad_token_id,
        padding_free=layout.padding_free, varlen=layout.attention.varlen,
        num_workers=0 if opts.debug else cfg.data.num_workers,
        pin_memory=d.device.type == "cuda", rows=objective.rows,
    )  # fmt: skip
    out = Path(cfg.output_dir)
    unprofiled = out_of_reach(cfg.log.profile, start_step, steps)
    if unprofiled and d.is_main:
        log.warning(unprofiled)
    metrics_file = out / (replay_name(data_rank, data_world) if opts.as_rank else "metrics.jsonl")
    if d.is_main:
        truncate_after(metrics_file, start_step)  # rows past the checkpoint: redone
    tracking = d.is_main and not opts.as_rank  # a replay logs to no tracker
    resumed_ids = resumed.state.get("trackers", {}) if resumed else {}
    opened = trackers.open_all(cfg, out, resumed_ids) if tracking else []
    if opened:
        log.info(f"trackers: {trackers.describe(opened)}")
    return Run(
        cfg=cfg, d=d, opts=opts, resumed=resumed, data_rank=data_rank, data_world=data_world,
        tokenizer=tokenizer, samples=samples, eval_samples=eval_samples, order=order,
        steps=steps, start_step=start_step, layout=layout, objective=objective, model=model,
        trainee=trainee, optimizer=optimizer, scheduler=scheduler,
        batches=faults.failing(batches, inputs.fail_at, start_step, order.accumulation),
        saver=None if opts.as_rank else checkpoint.Saver.for_run(cfg, d, tokenizer),
        metrics=MetricsWriter(metrics_file, enabled=d.is_main, trackers=opened),
        ids_log=sample_id_log(cfg, data_rank, data_world, start_step),
        bar=tqdm(total=steps, initial=start_step, disable=not d.is_main, desc="train",
                 unit="step", mininterval=0.5),
        window=LogWindow(checkpoint.log_window(resumed)), adapter_sha=adapter_sha,
        profile=Profile(cfg.log.profile, out / "profile",
                        f"rank{data_rank}" + ("-replay" if opts.as_rank else ""), d.device),
    )  # fmt: skip


def with_agreed_seed(cfg: RunConfig, d: Dist, resumed: checkpoint.Loaded | None) -> RunConfig:
    """`cfg` with the seed all ranks use: a configured one wins (a changed one was refused by
    prepare_resume unless forced), null inherits the checkpoint's, or rank 0 draws one. Rank 0
    writes the resolved config into OUTPUT/config.yaml."""
    inherited = resumed.state["seed"] if resumed and cfg.seed is None else cfg.seed
    cfg = cfg.model_copy(update={"seed": agree_seed(inherited, d)})
    if d.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        chash = config_mod.dump(cfg, out / "config.yaml")
        logmod.get().info(f"output: {out.resolve()}  seed: {cfg.seed}  config_hash: {chash}")
    return cfg


def build_samples(data: DataConfig, d: Dist, tokenizer, what: str, pairs: bool) -> Samples:
    """Rank 0 tokenises (or finds the cache); the other ranks wait for it as long as it takes
    (not launch.timeout_s), then read what it wrote. `what`: the data, for the log; `pairs`:
    answer pairs (finetune.stage=preference)."""
    with main_first(d, f"reads or tokenises {what}"):
        if d.is_main:
            samples, how = cache.load_or_build(data, tokenizer, pairs=pairs)
            logmod.get().info(f"{what}: {how}")
    if not d.is_main:
        samples, _ = cache.load_or_build(data, tokenizer, write=False, pairs=pairs)
    return samples


def total_steps(cfg: RunConfig, order: Order) -> int:
    """train.max_steps when set (it may run past train.epochs), else every step of every epoch."""
    return cfg.train.max_steps or cfg.train.epochs * order.steps_per_epoch


def already_complete(loaded: checkpoint.Loaded, steps: int, out: Path, d: Dist) -> bool:
    """Whether the checkpoint to resume from ends the run and rank 0 sees its final/ model:
    then nothing is trained or rewritten (rank 0 decides, so every rank returns together).
    A finished run without final/ (stopped while writing it) goes on to write it."""
    done = int(loaded.state["step"])
    if done < steps:
        return False
    seen = d.is_main and (out / "final").is_dir()
    if not all_reduce_sum([float(seen)], d)[0]:
        return False
    logmod.get().info(
        f"the run is already complete ({done} of {steps} steps, model in {out / 'final'}): "
        "nothing to train, nothing rewritten. To train more: raise train.max_steps (or "
        "train.epochs); to train afresh: a new output_dir, or checkpoint.resume=never "
        "checkpoint.overwrite=true"
    )
    return True


def choose_layout(cfg: RunConfig, d: Dist, samples: Samples) -> Layout:
    """Padding-free rows or not, and the attention kernel, for this model, device and data."""
    support = attention.model_support(cfg.model)
    mean_length = samples.token_count() / max(len(samples), 1)
    free = attention.padding_free(cfg, d.device, mean_length, support)
    shared_rows = free or cfg.data.packing
    return Layout(
        free, cfg.data.packing, attention.choose(cfg.model, d.device, shared_rows, support)
    )


def build_model(
    cfg: RunConfig, seed: int, d: Dist, attn: attention.Choice, from_adapter: bool = True
) -> torch.nn.Module:
    """The model as it trains: loaded or initialised, adapters applied (with `from_adapter`,
    a new run's, the weights of finetune.lora.init_from), on this rank's device, with the
    attention kernel `attn` (model/attention.choose)."""
    quantize = cfg.finetune.lora.quantize if cfg.finetune.method == "lora" else None
    mcfg = cfg.model.model_copy(update={"attn_implementation": attn.name or "auto"})
    model = load_model(mcfg, derive_seed(seed, "init"), quantize)
    model = adapters.apply(cfg.finetune, model, derive_seed(seed, "adapter"))
    if from_adapter and cfg.finetune.method == "lora" and cfg.finetune.lora.init_from:
        logmod.get().info(f"finetune: {adapters.load_init_from(cfg, model)}")
        warning = adapters.init_from_base_warning(cfg)
        if warning:
            logmod.get().warning(warning)
    if not quantize:  # a quantised model is placed on its device as it loads
        if not parallel.shards_weights(cfg, d):  # FSDP keeps one dtype per unit
            hold_frozen_in_compute_dtype(cfg, model)
        model = model.to(parallel.load_device(cfg, d))  # FSDP: the CPU, until it is sharded
    model.train()
    return model


def check_isolation(cfg: RunConfig, d: Dist, model: torch.nn.Module, attn) -> str:
    """Refuse a model whose samples see each other in a shared row (attention.check_isolation);
    the note for the attention log line. Run where the model is: with FSDP that is the CPU
    before sharding, where the GPU's variable-length kernel cannot run (then it is not run)."""
    device = parallel.load_device(cfg, d)
    if device.type != d.device.type and attn.varlen:
        return "; samples sharing a row: kept apart by the varlen boundaries"
    dtype = DTYPES[cfg.model.dtype] if parallel.mixed(cfg) else None
    attention.check_isolation(model, attn, device, dtype)
    return "; checked: samples sharing a row do not see each other"


def hold_frozen_in_compute_dtype(cfg: RunConfig, model: torch.nn.Module) -> int:
    """Mixed precision keeps float32 master copies of what trains only: weights that never
    change (a LoRA base, frozen blocks) are cast to the compute dtype, halving their memory;
    they are used in that dtype anyway. Returns the number of parameters cast."""
    if not parallel.mixed(cfg):
        return 0
    dtype = DTYPES[cfg.model.dtype]
    cast = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast


def restore(
    cfg: RunConfig, d: Dist, resumed: checkpoint.Loaded | None, parts: tuple, data_rank: int,
    steps: int,
) -> int:  # fmt: skip
    """Load the checkpoint into `parts` (model, optimizer, scheduler) and this rank's random
    generators; seed them afresh for a new run or a rank the checkpoint's world lacked.
    Returns the number of steps already done."""
    if resumed is None:
        seed_rank_rngs(cfg.seed, data_rank, 0)
        return 0
    model, optimizer, scheduler = parts
    restored = checkpoint.load_into(
        resumed, model, optimizer, scheduler, data_rank, parallel.shards_weights(cfg, d)
    )
    start_step = int(resumed.state["step"])
    log = logmod.get()
    log.info(f"resuming from {resumed.path} at step {start_step} (checkpoint.resume)")
    note = checkpoint.thread_change(resumed, torch.get_num_threads(), d.device)
    if note:
        log.warning(note)
    if start_step >= steps:
        log.info(f"the run's {steps} steps are done; writing its final/ model, missing so far")
    if not restored:
        seed_rank_rngs(cfg.seed, data_rank, start_step)
    return start_step


def seed_rank_rngs(seed: int, rank: int, step: int = 0) -> None:
    """Per-rank randomness (dropout and the like) never touches the data order or the init."""
    s = derive_seed(seed, "rank", rank, step)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def replay_name(rank: int, world: int) -> str:
    """A replay's metrics file: the run's own metrics.jsonl is left as the run wrote it."""
    return f"metrics-replay-rank{rank}-of-{world}.jsonl"


def sample_id_log(cfg: RunConfig, rank: int, world: int, start_step: int):
    """log.sample_ids: OUTPUT/sample_ids/rank-R-of-W.jsonl, open for appending past
    `start_step` (rows after it are from steps that will be redone); None when off."""
    if not cfg.log.sample_ids:
        return None
    path = Path(cfg.output_dir) / "sample_ids" / f"rank-{rank}-of-{world}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    truncate_after(path, start_step)
    return path.open("a", encoding="utf-8")


def log_plan(
    cfg: RunConfig, samples: Samples, order: Order, steps: int, model, padding_free: bool
) -> None:
    """The start-up log's account of the data, the steps and what trains."""
    log = logmod.get()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    st = samples.stats
    held = st.held_out
    held = f" ({held} more held out: data.val_fraction={cfg.data.val_fraction})" if held else ""
    log.info(
        f"data: {samples.sample_count()} samples{held} from {st.records} records, "
        f"{samples.token_count()} tokens ({samples.target_token_count()} trained); "
        f"longer than {cfg.data.max_length}: {st.truncated} truncated, {st.dropped} "
        f"dropped; fingerprint {samples.fingerprint}"
    )
    if samples.packed:
        log.info(
            f"packing: {samples.sample_count()} samples into {len(samples)} sequences of "
            f"{cfg.data.max_length} tokens, {st.packing_efficiency:.1%} of them real tokens"
        )
    if st.skipped:
        first = "\n  ".join(st.first_skipped)
        log.warning(
            f"skipped {st.skipped} bad records (data.on_bad_record=skip); first:\n  {first}"
        )
    for warn, line in describe(st, cfg.data):
        (log.warning if warn else log.info)(f"data: {line}")
    unit = "packed sequences" if samples.packed else "samples"
    if cfg.finetune.stage == "preference":
        unit = f"answer pairs ({cfg.preference.loss}, reference: {reference_note(cfg)})"
    pairs = cfg.finetune.stage == "preference"
    for line in mixing.table(cfg.data.train, samples, pairs, order.mixture):
        log.info(f"data mix: {line}")
    log.info(
        f"plan: {steps} optimizer steps ({epochs_text(cfg, order, steps)}) of {order.global_size} "
        f"{unit} = {order.world_size} process(es) x {order.accumulation} accumulation x "
        f"{order.micro_size} micro-batch; {trainable / 1e6:.2f}M trainable parameters"
    )
    log.info(f"finetune: {adapters.describe(cfg.finetune, model)}")
    log.info(
        f"micro-batches: {'padding-free rows' if padding_free else 'padded rows'}"
        f"{', grouped by length' if cfg.data.group_by_length else ''} (data.padding_free="
        f"{cfg.data.padding_free}, data.group_by_length={cfg.data.group_by_length})"
    )


def reference_note(cfg: RunConfig) -> str:
    """Which reference model the preference loss uses, and what it costs, for the plan line."""
    from lockstep.training.preference import reference_of

    return {
        "none": "none, the loss is reference-free",
        "adapters_off": "the model with its LoRA adapters off (no copy; one more forward "
        "pass without gradients per micro-batch)",
        "live": "a frozen copy of the starting model (its weights once more in memory; one "
        "more forward pass without gradients per micro-batch)",
        "precompute": "the starting model's log-probabilities, computed once before training",
    }[reference_of(cfg)]


def epochs_text(cfg: RunConfig, order: Order, steps: int) -> str:
    """How many epochs `steps` make, and which setting decided it."""
    per = order.steps_per_epoch
    if not cfg.train.max_steps:
        return f"{cfg.train.epochs} epoch(s) of {per} steps: train.epochs"
    epochs = f"{steps / per:.2f} epochs of {per} steps"
    if steps != cfg.train.epochs * per:
        return f"{epochs}: train.max_steps={steps} wins over train.epochs={cfg.train.epochs}"
    return f"{epochs}: train.max_steps"
