"""The training loop, readable top to bottom: resume or start, build, then step, log, save."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from lockstep import config as config_mod
from lockstep.config import DataConfig, RunConfig
from lockstep.data import cache, templates
from lockstep.data.dataset import Samples, describe
from lockstep.data.loader import micro_batches
from lockstep.data.order import PAD, Order, batch_sha
from lockstep.dist import (
    Dist,
    agree_seed,
    all_reduce_sum,
    check_lockstep,
    derive_seed,
    main_first,
    params_checksum,
)
from lockstep.errors import TrainingError
from lockstep.model import adapters, attention
from lockstep.model.load import DTYPES, load_model, load_tokenizer, quiet_bars, resolve
from lockstep.report import compare
from lockstep.report import log as logmod
from lockstep.report.metrics import MetricsWriter, truncate_after
from lockstep.report.plot import plot_loss
from lockstep.training import checkpoint, parallel, sharded
from lockstep.training.evaluate import eval_split, evaluate
from lockstep.training.loss import backward_scale, with_target_index
from lockstep.training.optim import build_optimizer, build_scheduler
from lockstep.training.options import RunOptions
from lockstep.training.preempt import Preempted, StopFlag


def seed_rank_rngs(seed: int, rank: int, step: int = 0) -> None:
    """Per-rank randomness (dropout and the like) never touches the data order or the init."""
    s = derive_seed(seed, "rank", rank, step)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def total_steps(cfg: RunConfig, order: Order) -> int:
    """train.max_steps when set (it may run past train.epochs), else every step of every epoch."""
    return cfg.train.max_steps or cfg.train.epochs * order.steps_per_epoch


def count(samples: Samples, ids: np.ndarray) -> tuple[int, int]:
    """(tokens, target tokens) of the real samples among `ids`."""
    real = [int(i) for i in ids if i != PAD]
    return sum(len(samples.input_ids[i]) for i in real), sum(samples.target_tokens(i) for i in real)


def run(cfg: RunConfig, d: Dist, opts: RunOptions | None = None) -> Path:
    opts = opts or RunOptions()
    log = logmod.get()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    with main_first(d):  # deleting a large leftover may take longer than launch.timeout_s
        if d.is_main:
            for leftover in checkpoint.clean_incomplete(ckpt_root):
                log.info(f"removed an incomplete checkpoint (an interrupted save): {leftover}")
    resume_from = checkpoint.find_resume(cfg)
    loaded = checkpoint.read(resume_from) if resume_from else None
    if loaded:
        checkpoint.check_config_change(loaded, cfg)
    with main_first(d):
        if not loaded and cfg.checkpoint.overwrite and d.is_main:
            _delete_checkpoints(ckpt_root)

    # a configured seed wins (a changed one is refused above unless forced); null inherits
    inherited = loaded.state["seed"] if loaded and cfg.seed is None else cfg.seed
    seed = agree_seed(inherited, d)
    if cfg.testing.desync == "seed" and d.rank == cfg.testing.desync_rank:
        seed += 1  # test-only: a rank that did not take the agreed seed
    cfg = cfg.model_copy(update={"seed": seed})
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        chash = config_mod.dump(cfg, out / "config.yaml")
        log.info(f"output: {out.resolve()}  seed: {seed}  config_hash: {chash}")

    tokenizer = load_tokenizer(cfg.model, templates.configured(cfg.data))
    samples = build_samples(cfg.data, d, tokenizer, "the training data")
    samples, eval_samples = eval_split(
        cfg, samples, seed, lambda data: build_samples(data, d, tokenizer, "the eval data")
    )
    if loaded:
        checkpoint.check_data_change(loaded, samples.fingerprint, cfg)
    if cfg.testing.desync == "data" and d.rank == cfg.testing.desync_rank:
        samples = samples.without_last()  # test-only: a rank that read different data
    rank, world = opts.as_rank or (d.rank, d.world_size)
    lengths = samples.lengths() if cfg.data.group_by_length else None
    order = Order(seed, len(samples), cfg.batch.global_size, cfg.batch.micro_size, world, lengths)
    steps = total_steps(cfg, order)
    if loaded and _already_complete(loaded, steps, out, d):
        return out
    support = attention.model_support(cfg.model)
    mean_length = samples.token_count() / max(len(samples), 1)
    free = attention.padding_free(cfg, d.device, mean_length, support)
    shared_rows = free or cfg.data.packing
    attn = attention.choose(cfg.model, d.device, shared_rows, support)
    model = build_model(cfg, seed, d, attn)
    isolation = check_isolation(cfg, d, model, attn) if shared_rows else ""
    # FSDP: this rank's own weights, summed before they become shards (see params_checksum)
    built = params_checksum(model) if parallel.sharded(cfg, d) else None
    engine = parallel.prepare(cfg, d, model)  # FSDP shards the model's parameters in place
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, steps)
    start_step, rng_restored = 0, False
    if loaded:
        rng_restored = checkpoint.load_into(
            loaded, engine, optimizer, scheduler, rank, parallel.sharded(cfg, d)
        )
        start_step = int(loaded.state["step"])
        log.info(f"resuming from {loaded.path} at step {start_step} (checkpoint.resume)")
        note = checkpoint.thread_change(loaded, torch.get_num_threads(), d.device)
        if note:
            log.warning(note)
        if start_step >= steps:
            log.info(f"the run's {steps} steps are done; writing its final/ model, missing so far")
    if not rng_restored:  # a new run, or a rank the checkpoint's world did not have
        seed_rank_rngs(seed, rank, start_step)
    _log_plan(cfg, samples, order, steps, world, model, free)
    log.info(f"attention: {model.config._attn_implementation} ({attn.reason}{isolation})")
    weights = built or params_checksum(model)
    check_lockstep(
        fingerprint_fields(cfg, samples, order, weights, start_step), d, "after building"
    )
    engine = parallel.replicate(cfg, d, engine)
    batches = micro_batches(
        samples, order, rank, start_step, steps, tokenizer.pad_token_id, free,
        0 if opts.debug else cfg.data.num_workers, d.device.type == "cuda", attn.varlen,
    )  # fmt: skip

    saver = checkpoint.Saver(ckpt_root, cfg.checkpoint.keep_last, rank, tokenizer, d.world_size)
    metrics_file = out / (_replay_name(rank, world) if opts.as_rank else "metrics.jsonl")
    if d.is_main:
        truncate_after(metrics_file, start_step)  # rows past the checkpoint: redone
    tb_dir = out / "tensorboard" if cfg.log.tensorboard and not opts.as_rank else None
    metrics = MetricsWriter(metrics_file, enabled=d.is_main, tensorboard=tb_dir)
    ids_log = _sample_id_log(cfg, out, rank, world, start_step)
    stop = StopFlag().install()
    bar = tqdm(total=steps, initial=start_step, disable=not d.is_main, desc="train", unit="step",
               mininterval=0.5)  # fmt: skip
    start = time.perf_counter()
    # the losses since the last logged step, kept in checkpoints: a resume logs the same rows
    window_tokens, window_losses, window_start = 0, checkpoint.log_window(loaded), start
    try:
        for step in range(start_step, steps):
            if cfg.testing.fail_at_step == step + 1 and cfg.testing.fail_rank == rank:
                raise TrainingError(f"injected failure at step {step + 1} (testing.fail_at_step)")
            loss, grad_norm, lr, tokens, targets = train_step(
                cfg, d, opts, engine, optimizer, scheduler, samples, order, step, batches, ids_log
            )
            window_tokens += tokens
            window_losses.append(loss)
            done = step + 1
            if d.is_main and (done % cfg.log.every_steps == 0 or done == steps):
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                mean_loss = sum(window_losses) / len(window_losses)
                window_tokens, window_losses, window_start = 0, [], now
                metrics.write({
                    "step": done,
                    "epoch": round(step / order.steps_per_epoch, 4),
                    "loss": mean_loss,  # mean over the steps since the previous logged step
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "target_tokens": targets,
                    "tokens_per_s": round(tps, 1),
                    "elapsed_s": round(now - start, 3),
                    "batch_sha": batch_sha(order.global_batch(step)),
                    **({"replay": f"{rank}/{world}"} if opts.as_rank else {}),
                    **_device_memory(d),
                })  # fmt: skip
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                refresh=False)  # fmt: skip
            bar.update(1)
            if eval_samples is not None and (
                done % (cfg.eval.every_steps or steps) == 0 or done == steps
            ):
                result = evaluate(
                    parallel.unwrap(engine), eval_samples, d, cfg.batch.micro_size,
                    tokenizer.pad_token_id, free, parallel.autocast(cfg, d), attn.varlen,
                )  # fmt: skip
                metrics.write({"step": done, **result})
                logmod.get().info(f"step {done}: eval_loss {result['eval_loss']:.4f}, "
                                  f"eval_ppl {result['eval_ppl']:.2f}")  # fmt: skip
            signum = stop.agreed(d)
            every = cfg.checkpoint.every_steps
            if signum or done == steps or (every and done % every == 0):
                path = None  # a replay saves nothing
                if not opts.as_rank:
                    path = save_checkpoint(
                        cfg, d, saver, engine, optimizer, scheduler, samples, order, done,
                        window_losses,
                    )  # fmt: skip
                if signum:
                    raise Preempted(signum, done, path)
    finally:
        stop.uninstall()
        bar.close()
        metrics.close()
        if ids_log:
            ids_log.close()

    took = time.perf_counter() - start
    if opts.as_rank:
        log.info(_replay_summary(rank, world, start_step, steps, took, metrics_file))
        return out
    full = final_state(cfg, d, engine, model)
    if d.is_main:
        final = save_final(model, tokenizer, out, cfg, full)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        log.info(f"done in {took:.1f}s; model: {final}; curve: {out / 'loss.png'}")
        if cfg.eval.show and eval_samples is not None:
            trained = load_final(final) if parallel.sharded(cfg, d) else model
            log.info(before_after(cfg, trained, tokenizer, eval_samples))
    return out


def before_after(cfg: RunConfig, trained: torch.nn.Module, tokenizer, eval_samples) -> str:
    """The eval.show table: the first eval prompts answered by the model the run started from
    (built again from the seed, or loaded) and by `trained`."""
    device = next(trained.parameters()).device
    start = load_model(cfg.model, derive_seed(cfg.seed, "init")).to(device)
    rows = compare.table(start, trained, tokenizer, eval_samples, cfg.eval.show)
    return f"what training changed, on the first {len(rows)} eval prompts:\n{compare.render(rows)}"


def load_final(final: Path) -> torch.nn.Module:
    """The trained model from its final/ folder (a full model, or an adapter on its base)."""
    from lockstep import infer

    return infer.load(str(final)).model


def _delete_checkpoints(root: Path) -> None:
    """checkpoint.overwrite with resume=never: delete the earlier run's checkpoints, and say so."""
    found = checkpoint.complete_checkpoints(root)
    shutil.rmtree(root, ignore_errors=True)
    if found:
        logmod.get().warning(
            f"checkpoint.overwrite=true: deleted {len(found)} checkpoint(s) of an earlier run in "
            f"{root} (newest: {found[-1].name}); training from step 0"
        )


def _already_complete(loaded: checkpoint.Loaded, steps: int, out: Path, d: Dist) -> bool:
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


def _replay_name(rank: int, world: int) -> str:
    """A replay's metrics file: the run's own metrics.jsonl is left as the run wrote it."""
    return f"metrics-replay-rank{rank}-of-{world}.jsonl"


def _replay_summary(
    rank: int, world: int, start: int, steps: int, took: float, metrics_file: Path
) -> str:
    """What a replay (--debug --as-rank) did, and why its numbers are not the run's."""
    return (
        f"replay of rank {rank} of {world} done: steps {start + 1}-{steps} in {took:.1f}s; "
        f"losses in {metrics_file}. No checkpoint and no final/ model are written (a replay "
        f"is for stepping through rank {rank}'s batches). Its losses are rank "
        f"{rank}'s share of each step (its micro-batches' loss over the whole global batch's "
        f"target tokens; the {world} ranks' shares add up to the run's loss), and its weights "
        "get only this rank's gradients, so they drift from the real run after the first step"
    )


def build_model(cfg: RunConfig, seed: int, d: Dist, attn: attention.Choice) -> torch.nn.Module:
    """The model as it trains: loaded or initialised, adapters applied, on this rank's device,
    with the attention kernel `attn` (model/attention.choose)."""
    quantize = cfg.finetune.lora.quantize if cfg.finetune.method == "lora" else None
    mcfg = cfg.model.model_copy(update={"attn_implementation": attn.name or "auto"})
    model = load_model(mcfg, derive_seed(seed, "init"), quantize)
    model = adapters.apply(cfg.finetune, model, derive_seed(seed, "adapter"))
    if not quantize:  # a quantised model is placed on its device as it loads
        if not parallel.sharded(cfg, d):  # FSDP keeps one dtype per unit; its shards are small
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


def final_state(
    cfg: RunConfig, d: Dist, engine: torch.nn.Module, model: torch.nn.Module
) -> dict[str, torch.Tensor] | None:
    """With FSDP, the weights final/ needs, gathered from every rank's shards onto rank 0's CPU
    (a collective): a LoRA adapter only (its frozen base is never gathered), every weight for a
    full or freeze run. None without FSDP: the model itself holds them."""
    if not parallel.sharded(cfg, d):
        return None
    return sharded.full_state(engine, trainable_only=adapters.is_peft(model))


def build_samples(data: DataConfig, d: Dist, tokenizer, what: str) -> Samples:
    """Rank 0 tokenises (or finds the cache); the other ranks wait for it as long as it takes
    (not launch.timeout_s), then read what it wrote. `what`: the data, for the log."""
    with main_first(d, f"reads or tokenises {what}"):
        if d.is_main:
            samples, how = cache.load_or_build(data, tokenizer)
            logmod.get().info(f"{what}: {how}")
    if not d.is_main:
        samples, _ = cache.load_or_build(data, tokenizer, write=False)
    return samples


def train_step(
    cfg: RunConfig, d: Dist, opts: RunOptions, engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler, samples: Samples, order: Order, step: int,
    batches, ids_log,
) -> tuple[float, float, float, int, int]:  # fmt: skip
    """One optimizer step over this rank's micro-batches; returns loss, grad norm, lr, tokens."""
    global_tokens, global_targets = count(samples, order.global_batch(step))
    scale = backward_scale(d.world_size, global_targets)
    # the loss stays on the device until the step ends: one host sync per step, not per micro
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for a in range(order.accumulation):
        ids, batch = next(batches)
        if ids_log:
            ids_log.write(json.dumps({"step": step + 1, "micro": a, "ids": ids.tolist()}) + "\n")
        batch = attention.to_device(with_target_index(batch), d.device, non_blocking=True)
        with parallel.gradient_sync(engine, last=a == order.accumulation - 1):
            with parallel.autocast(cfg, d):
                ce = engine(batch)
            (ce * scale).backward()
        if opts.debug and not math.isfinite(ce.item()):
            raise TrainingError(f"step {step + 1}, micro-batch {a}: non-finite loss {ce.item()}")
        loss_sum += ce.detach()
    if d.distributed:
        tdist.all_reduce(loss_sum)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(engine.parameters(), clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    total, grad_norm = torch.stack([loss_sum, norm.to(loss_sum)]).tolist()  # the step's sync
    loss = total / max(global_targets, 1)
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise TrainingError(
            f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
            "lower optim.lr, check the data, or use model.dtype=float32"
        )
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr, global_tokens, global_targets


def save_checkpoint(
    cfg: RunConfig, d: Dist, saver: checkpoint.Saver, engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler, samples: Samples, order: Order, done: int,
    log_window: list[float],
) -> Path:  # fmt: skip
    """Verify lockstep, then every rank writes its RNG state (and its shard, with FSDP) and
    rank 0 completes the folder while the others wait (as long as that takes).
    `log_window`: the losses of the steps since the last logged one."""
    bare = parallel.unwrap(engine)
    # FSDP: each weight lives on one rank only, so there is nothing to compare; it was when built
    weights = "sharded" if parallel.sharded(cfg, d) else params_checksum(bare.model)
    check_lockstep(fingerprint_fields(cfg, samples, order, weights, done), d, f"checkpoint {done}")
    saver.write_rank_files(done)
    if cfg.train.strategy == "fsdp":
        saver.write_sharded(done, bare, optimizer)
    if d.distributed:
        tdist.barrier()
    path = saver.root / checkpoint.folder_name(done)
    with main_first(d):
        if d.is_main:
            state = {
                "step": done,
                "epoch": order.epoch_of(done),
                "samples_consumed": done * order.global_size,
                "seed": cfg.seed,
                "config_hash": config_mod.config_hash(cfg),
                "world_size": d.world_size,
                "lockstep_version": _version(),
                "data_fingerprint": samples.fingerprint,
                "log_window": list(log_window),
                "threads": torch.get_num_threads(),  # CPU results depend on it (bit-exact resume)
            }
            path = saver.write_shared(done, bare.model, optimizer, scheduler, state, cfg)
    return path


def _device_memory(d: Dist) -> dict[str, float]:
    """Peak accelerator memory of this rank so far (CUDA only)."""
    if d.device.type != "cuda":
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(d.device) / 2**30, 3)}


def _version() -> str:
    from lockstep import __version__

    return __version__


def _log_plan(
    cfg: RunConfig, samples: Samples, order: Order, steps: int, world: int, model, free: bool
) -> None:
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
    log.info(
        f"plan: {steps} optimizer steps ({_epochs(cfg, order, steps)}) of {order.global_size} "
        f"{unit} = {world} process(es) x {order.accumulation} accumulation x "
        f"{order.micro_size} micro-batch; {trainable / 1e6:.2f}M trainable parameters"
    )
    log.info(f"finetune: {adapters.describe(cfg.finetune, model)}")
    log.info(
        f"micro-batches: {'padding-free rows' if free else 'padded rows'}"
        f"{', grouped by length' if cfg.data.group_by_length else ''} (data.padding_free="
        f"{cfg.data.padding_free}, data.group_by_length={cfg.data.group_by_length})"
    )


def _epochs(cfg: RunConfig, order: Order, steps: int) -> str:
    """How many epochs `steps` make, and which setting decided it."""
    per = order.steps_per_epoch
    if not cfg.train.max_steps:
        return f"{cfg.train.epochs} epoch(s) of {per} steps: train.epochs"
    epochs = f"{steps / per:.2f} epochs of {per} steps"
    if steps != cfg.train.epochs * per:
        return f"{epochs}: train.max_steps={steps} wins over train.epochs={cfg.train.epochs}"
    return f"{epochs}: train.max_steps"


def fingerprint_fields(
    cfg: RunConfig, samples: Samples, order: Order, weights: str, step: int = 0
) -> dict[str, str]:
    """What every rank must agree on before (and while) training together; `weights`: the
    params_checksum of this rank's trainable weights."""
    import transformers

    return {
        "lockstep": _version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config_hash": config_mod.config_hash(cfg, exclude=("launch", "testing")),
        "seed": str(cfg.seed),
        "data_fingerprint": samples.fingerprint,
        "num_samples": str(len(samples)),
        "next_batch_sha": batch_sha(order.global_batch(step)),
        "params_checksum": weights,
    }


def _sample_id_log(cfg: RunConfig, out: Path, rank: int, world: int, start_step: int):
    if not cfg.log.sample_ids:
        return None
    path = out / "sample_ids" / f"rank-{rank}-of-{world}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    truncate_after(path, start_step)
    return path.open("a", encoding="utf-8")


def save_final(
    model: torch.nn.Module, tokenizer, out: Path, cfg: RunConfig, state: dict | None = None
) -> Path:
    """A Hugging Face folder, written aside and renamed into place so it is never half there.

    A LoRA run's final/ is a PEFT adapter (PeftModel.from_pretrained opens it). Its base is
    model.path; for a built-in model, whose weights were initialised from the seed, the base is
    saved next to it in OUTPUT/base/ so the adapter can be loaded anywhere.
    """
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters.is_peft(model):
        base = _base_for_adapter(cfg, out, tokenizer)
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base
    # state: the full weights gathered from FSDP shards (the model itself holds only a shard)
    with quiet_bars():
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _base_for_adapter(cfg: RunConfig, out: Path, tokenizer) -> str:
    where, fresh = resolve(cfg.model.path)
    if not fresh:
        return str(Path(where).resolve()) if Path(where).exists() else where
    base = out / "base"
    with quiet_bars():
        load_model(cfg.model, derive_seed(cfg.seed, "init")).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return str(base.resolve())
