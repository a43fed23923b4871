"""The training loop, readable top to bottom: build, then step, log, save."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lockstep import config as config_mod
from lockstep.config import RunConfig
from lockstep.data import dataset
from lockstep.data.collate import collate
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD, Order, batch_sha
from lockstep.dist import (
    Dist,
    agree_seed,
    all_reduce_sum,
    check_lockstep,
    derive_seed,
    params_checksum,
)
from lockstep.errors import TrainingError
from lockstep.model.load import load_model, load_tokenizer
from lockstep.report import log as logmod
from lockstep.report.metrics import MetricsWriter
from lockstep.report.plot import plot_loss
from lockstep.training.loss import backward_scale, cross_entropy_sum
from lockstep.training.optim import build_optimizer, build_scheduler
from lockstep.training.options import RunOptions


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Per-rank randomness (dropout and the like) never touches the data order or the init."""
    s = derive_seed(seed, "rank", rank)
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
    seed = agree_seed(cfg.seed, d)
    if cfg.testing.desync == "seed" and d.rank == cfg.testing.desync_rank:
        seed += 1  # test-only: a rank that did not take the agreed seed
    cfg = cfg.model_copy(update={"seed": seed})
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        chash = config_mod.dump(cfg, out / "config.yaml")
        log.info(f"output: {out.resolve()}  seed: {seed}  config_hash: {chash}")

    tokenizer = load_tokenizer(cfg.model)
    samples = dataset.build(cfg.data, tokenizer)
    if cfg.testing.desync == "data" and d.rank == cfg.testing.desync_rank:
        samples = samples.without_last()  # test-only: a rank that read different data
    rank, world = opts.as_rank or (d.rank, d.world_size)
    order = Order(seed, len(samples), cfg.batch.global_size, cfg.batch.micro_size, world)
    steps = total_steps(cfg, order)
    model = load_model(cfg.model, derive_seed(seed, "init")).to(d.device)
    model.train()
    seed_rank_rngs(seed, rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        f"data: {samples.stats['samples']} samples, {samples.stats['tokens']} tokens "
        f"({samples.stats['target_tokens']} trained), {samples.stats['truncated']} truncated "
        f"to {cfg.data.max_length}; fingerprint {samples.fingerprint}"
    )
    log.info(
        f"plan: {steps} optimizer steps ({order.steps_per_epoch}/epoch) of {order.global_size} "
        f"samples = {world} process(es) x {order.accumulation} accumulation x "
        f"{order.micro_size} micro-batch; {trainable / 1e6:.2f}M trainable parameters"
    )
    fingerprint = fingerprint_fields(cfg, samples, order, model)
    check_lockstep(fingerprint, d, when="after building data and model")
    if d.distributed:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, steps)
    if d.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=d.is_main)
    ids_log = _sample_id_log(cfg, out, rank, world)
    bar = tqdm(total=steps, disable=not d.is_main, desc="train", unit="step", mininterval=0.5)
    start = time.perf_counter()
    window_tokens, window_losses, window_start = 0, [], start

    for step in range(steps):
        if cfg.testing.fail_at_step == step + 1 and cfg.testing.fail_rank == rank:
            raise TrainingError(f"injected failure at step {step + 1} (testing.fail_at_step)")
        micro = order.micro_batches(step, rank)
        global_tokens, global_targets = count(samples, order.global_batch(step))
        scale = backward_scale(d.world_size, global_targets)
        loss_sum = 0.0
        for a, mb in enumerate(micro):
            if ids_log:
                ids_log.write(json.dumps({"step": step + 1, "micro": a, "ids": mb.tolist()}) + "\n")
            batch = collate(samples, mb, tokenizer.pad_token_id)
            batch = {k: v.to(d.device) for k, v in batch.items()}
            last = a == len(micro) - 1
            with model.no_sync() if d.distributed and not last else nullcontext():
                ce = cross_entropy_sum(model, batch)
                (ce * scale).backward()
            if opts.debug and not math.isfinite(ce.item()):
                raise TrainingError(
                    f"step {step + 1}, micro-batch {a}: non-finite loss {ce.item()}"
                )
            loss_sum += ce.item()
        loss = all_reduce_sum([loss_sum], d)[0] / max(global_targets, 1)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingError(
                f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                "lower optim.lr, check the data, or use model.dtype=float32"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window_tokens += global_tokens
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
                "tokens": global_tokens,
                "target_tokens": global_targets,
                "tokens_per_s": round(tps, 1),
                "elapsed_s": round(now - start, 3),
                "batch_sha": batch_sha(order.global_batch(step)),
                **({"replay": f"{rank}/{world}"} if opts.as_rank else {}),
            })  # fmt: skip
            bar.set_postfix(
                loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False
            )
        bar.update(1)

    bar.close()
    metrics.close()
    if ids_log:
        ids_log.close()
    if d.is_main and not opts.as_rank:
        final = save_final(getattr(model, "module", model), tokenizer, out)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        took = time.perf_counter() - start
        log.info(f"done in {took:.1f}s; model: {final}; curve: {out / 'loss.png'}")
    return out


def fingerprint_fields(
    cfg: RunConfig, samples: Samples, order: Order, model: torch.nn.Module, step: int = 0
) -> dict[str, str]:
    """What every rank must agree on before (and while) training together."""
    import transformers

    from lockstep import __version__

    return {
        "lockstep": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config_hash": config_mod.config_hash(cfg, exclude=("launch", "testing")),
        "seed": str(cfg.seed),
        "data_fingerprint": samples.fingerprint,
        "num_samples": str(len(samples)),
        "next_batch_sha": batch_sha(order.global_batch(step)),
        "params_checksum": params_checksum(model),
    }


def _sample_id_log(cfg: RunConfig, out: Path, rank: int, world: int):
    if not cfg.log.sample_ids:
        return None
    folder = out / "sample_ids"
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"rank-{rank}-of-{world}.jsonl").open("w", encoding="utf-8")


def save_final(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """A Hugging Face folder, written aside and renamed into place so it is never half there."""
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
