"""The training loop: `run` = build -> train -> finish.

- build (training/build.py): the `Run` (training/state.py), everything training needs;
- train: `train_step` for each step, then what follows a step: its log row, the eval, the
  checkpoint, a stop asked for by a signal;
- `train_step` = `forward_backward` over this rank's micro-batches, then `optimizer_step`;
- log.profile's steps are profiled by phase (training/profile.py: data, forward, backward,
  step, after);
- finish (training/final.py): the final model, the loss curve, the before/after table.

What the loss is belongs to the run's objective (training/objective.py); how checkpoints are
written and read, to training/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from lockstep.config import RunConfig
from lockstep.data.order import PAD, batch_sha
from lockstep.dist import Dist, check_lockstep, params_checksum
from lockstep.errors import TrainingError
from lockstep.model.attention import to_device
from lockstep.report import log as logmod
from lockstep.report.metrics import read as read_metrics
from lockstep.report.plot import plot_loss
from lockstep.training import checkpoint, final, parallel
from lockstep.training.build import build
from lockstep.training.evaluate import evaluate
from lockstep.training.loss import backward_scale
from lockstep.training.options import RunOptions
from lockstep.training.preempt import Preempted, StopFlag
from lockstep.training.profile import describe
from lockstep.training.state import Run, StepResult, fingerprint_fields


def run(cfg: RunConfig, d: Dist, opts: RunOptions | None = None) -> Path:
    """Train the run of `cfg` on this process (one of `d`'s ranks); its output folder."""
    state = build(cfg, d, opts or RunOptions())
    if state is None:  # the run was already complete
        return Path(cfg.output_dir)
    status = "failed"
    try:
        took = train(state)
        status = "finished"
    except Preempted:
        status = "stopped"
        raise
    finally:
        state.close(status)
    finish(state, took)
    return state.out


def train(run: Run) -> float:
    """Every step from run.start_step to run.steps; the seconds it took. A signal (SIGTERM,
    SIGINT) ends the step under way, saves a checkpoint and raises Preempted."""
    stop = StopFlag().install()
    try:
        if run.start_step == 0 and run.objective.metrics:  # where the objective's metrics start
            evaluate_now(run, 0)
            run.window.started = time.perf_counter()  # the first row's tokens/s: training only
        for step in range(run.start_step, run.steps):
            run.profile.begin(step + 1)
            result = train_step(run, step)
            with run.profile.phase("after"):
                log_step(run, result)
                evaluate_if_due(run, result.done)
                signum = stop.agreed(run.d)
                every = run.cfg.checkpoint.every_steps
                if signum or result.done == run.steps or (every and result.done % every == 0):
                    path = save(run, result.done)
                    if signum:
                        raise Preempted(signum, result.done, path)
            profiled = run.profile.end(result.done)
            if profiled and run.d.is_main:
                logmod.get().info(describe(profiled, run.profile.folder, run.profile.name))
    finally:
        stop.uninstall()
    return time.perf_counter() - run.started


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step (`step` counts from 0) over this rank's micro-batches of it."""
    with run.profile.phase("data"):
        ids = run.order.global_batch(step)
        rows = [int(i) for i in run.objective.rows(ids) if i != PAD]
        tokens = sum(len(run.samples.input_ids[i]) for i in rows)
        targets = sum(run.samples.target_tokens(i) for i in rows)
        denominator = run.objective.denominator(run.samples, ids)
    sums = forward_backward(run, step, backward_scale(run.d.world_size, denominator))
    with run.profile.phase("step"):
        return optimizer_step(run, step, sums, denominator, (tokens, targets))


def optimizer_step(
    run: Run, step: int, sums: torch.Tensor, denominator: int, counts: tuple[int, int]
) -> StepResult:
    """The step's loss summed over the ranks, gradient clipping, the optimizer and the
    scheduler; `counts`: the global batch's (tokens, target tokens), for the log."""
    if run.d.distributed:
        tdist.all_reduce(sums)
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(run.trainee.parameters(), clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    *totals, grad_norm = torch.cat([sums, norm.to(sums).reshape(1)]).tolist()  # the step's sync
    loss, *metrics = (t / max(denominator, 1) for t in totals)
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise TrainingError(
            f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
            "lower optim.lr, check the data, or use model.dtype=float32"
        )
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    named = dict(zip(run.objective.metrics, metrics, strict=True))
    return StepResult(step + 1, loss, grad_norm, lr, *counts, named)


def forward_backward(run: Run, step: int, scale: float) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of `step`, each micro-batch's summed
    loss times `scale` (training/loss.py: backward_scale); returns the sum of their summed
    losses (then of the objective's metrics), still on the device (one host sync per step, in
    train_step)."""
    sums = torch.zeros(1 + len(run.objective.metrics), dtype=torch.float64, device=run.d.device)
    for a in range(run.order.accumulation):
        with run.profile.phase("data"):
            ids, batch = next(run.batches)
            if run.ids_log:
                run.ids_log.write(
                    json.dumps({"step": step + 1, "micro": a, "ids": ids.tolist()}) + "\n"
                )
            batch = to_device(run.objective.prepare(ids, batch), run.d.device, non_blocking=True)
        with parallel.gradient_sync(run.trainee, last=a == run.order.accumulation - 1):
            with run.profile.phase("forward"), parallel.autocast(run.cfg, run.d):
                summed = run.trainee(batch).reshape(-1)
            with run.profile.phase("backward"):
                (summed[0] * scale).backward()
        if run.opts.debug and not math.isfinite(summed[0].item()):
            raise TrainingError(
                f"step {step + 1}, micro-batch {a}: non-finite loss {summed[0].item()}"
            )
        sums += summed.detach()
    return sums


def log_step(run: Run, result: StepResult) -> None:
    """Rank 0 writes a metrics row every log.every_steps steps and at the last one (its loss:
    the mean over the steps since the previous row), and moves the progress bar."""
    run.window.add(result)
    done = result.done
    if run.d.is_main and (done % run.cfg.log.every_steps == 0 or done == run.steps):
        mean_loss, tokens_per_s = run.window.close()
        run.metrics.write({
            "step": done,
            "epoch": round((done - 1) / run.order.steps_per_epoch, 4),
            "loss": mean_loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": result.tokens,
            "target_tokens": result.target_tokens,
            **result.metrics,
            "tokens_per_s": round(tokens_per_s, 1),
            "elapsed_s": round(time.perf_counter() - run.started, 3),
            "batch_sha": batch_sha(run.order.global_batch(done - 1)),
            **({"replay": f"{run.data_rank}/{run.data_world}"} if run.replay else {}),
            **device_memory(run.d),
        })  # fmt: skip
        run.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{result.lr:.2e}",
                            tok_s=f"{tokens_per_s:,.0f}", refresh=False)  # fmt: skip
    run.bar.update(1)


def evaluate_if_due(run: Run, done: int) -> None:
    """The eval loss every eval.every_steps steps and at the last step (with eval data)."""
    if done % (run.cfg.eval.every_steps or run.steps) == 0 or done == run.steps:
        evaluate_now(run, done)


def evaluate_now(run: Run, done: int) -> None:
    """The eval row of step `done` (with eval data), logged and written to metrics.jsonl."""
    if run.eval_samples is None:
        return
    result = evaluate(
        parallel.unwrap(run.trainee), run.eval_samples, run.d, run.cfg.batch.micro_size,
        run.tokenizer.pad_token_id, run.layout.padding_free, parallel.autocast(run.cfg, run.d),
        run.layout.attention.varlen, run.objective,
    )  # fmt: skip
    run.metrics.write({"step": done, **result})
    shown = ", ".join(
        f"{k} {v:.2f}" if k == "eval_ppl" else f"{k} {v:.4f}"
        for k, v in result.items()
        if not k.endswith(("_tokens", "_units"))
    )
    logmod.get().info(f"step {done}: {shown}")


def save(run: Run, done: int) -> Path | None:
    """Verify lockstep, then checkpoint the run after `done` steps (every rank; training/
    checkpoint.py holds the protocol). A replay saves nothing: None."""
    if run.saver is None:
        return None
    # FSDP: each weight lives on one rank only, so there is nothing to compare; it was when built
    sharded = parallel.shards_weights(run.cfg, run.d)
    weights = "sharded" if sharded else params_checksum(run.model)
    fields = fingerprint_fields(
        run.cfg, run.samples, run.order, weights, done, run.objective, run.adapter_sha
    )
    check_lockstep(fields, run.d, f"checkpoint {done}")
    state = checkpoint.run_state(
        run.cfg, run.order, done, run.samples.fingerprint, run.window.losses,
        {"trackers": run.metrics.run_ids(),
         **({"init_from_adapter": run.adapter_sha} if run.adapter_sha else {})},
    )  # fmt: skip
    return run.saver.save(done, run.model, run.optimizer, run.scheduler, state, run.cfg)


def finish(run: Run, took: float) -> None:
    """After the last step: the final model, the loss curve and the before/after table (rank 0;
    with FSDP every rank first sends its shards). A replay only says what it did."""
    log = logmod.get()
    if run.replay:
        log.info(replay_summary(run, took))
        return
    state = final.final_state(run.cfg, run.d, run.model)
    if not run.d.is_main:
        return
    folder = final.save_final(run.model, run.tokenizer, run.out, run.cfg, state)
    plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
    log.info(f"done in {took:.1f}s; model: {folder}; curve: {run.out / 'loss.png'}")
    if run.objective.metrics and run.eval_samples is not None:
        log.info(final.preference_change(read_metrics(run.out / "metrics.jsonl")))
    if run.cfg.eval.show and run.eval_samples is not None:
        sharded = parallel.shards_weights(run.cfg, run.d)
        trained = final.load_final(folder) if sharded else run.model
        log.info(final.before_after(run.cfg, trained, run.tokenizer, run.eval_samples))


def replay_summary(run: Run, took: float) -> str:
    """What a replay (--debug --as-rank) did, and why its numbers are not the run's."""
    rank, world = run.data_rank, run.data_world
    metrics_file = run.metrics.path
    return (
        f"replay of rank {rank} of {world} done: steps {run.start_step + 1}-{run.steps} in "
        f"{took:.1f}s; losses in {metrics_file}. No checkpoint and no final/ model are written "
        f"(a replay is for stepping through rank {rank}'s batches). Its losses are rank "
        f"{rank}'s share of each step (its micro-batches' loss over the whole global batch's "
        f"target tokens; the {world} ranks' shares add up to the run's loss), and its weights "
        "get only this rank's gradients, so they drift from the real run after the first step"
    )


def device_memory(d: Dist) -> dict[str, float]:
    """Peak accelerator memory of this rank so far (CUDA only)."""
    if d.device.type != "cuda":
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(d.device) / 2**30, 3)}
