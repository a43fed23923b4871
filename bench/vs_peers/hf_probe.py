"""Measurements inside a Hugging Face Trainer run (TRL and LLaMA-Factory both train with one).

Imported by run_trl.py and run_llamafactory.py, in their own venvs: transformers only, no
lockstep. It measures the same things lockstep writes to metrics.jsonl:

* train_s: from the Trainer's on_train_begin (model, optimizer and dataloader built, nothing
  trained yet) to the on_step_end of the last optimizer step: the training loop alone, as
  lockstep's ``elapsed_s`` is (its clock starts before the first step, after the model and data
  are built, and stops after the last optimizer step).
* target_tokens: positions whose label is not -100 after the model's one-token shift (labels
  ``[..., 1:]``; a preference batch without labels: its ``completion_mask[..., 1:]``), counted on
  every micro-batch that ``Trainer.training_step`` receives: what the loss really covered.
  lockstep's ``target_tokens`` count the same positions.
* tokens: non-padding input tokens of those micro-batches; rows: their rows (a preference
  micro-batch holds a chosen and a rejected row per pair); positions: every position of their
  input rows, padding included (what the model really runs on).
* losses: the logged loss of every optimizer step (logging_steps=1); logs: every logged row.
* threads: torch's intra-op threads when the run ends.

It also holds the Trainer settings both peers run with (``trainer_settings``), so the two
runners cannot drift apart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback


class Probe(TrainerCallback):
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.t0: float | None = None
        self.t_last: float | None = None
        self.steps = 0
        self.target_tokens = 0
        self.tokens = 0
        self.rows = 0
        self.positions = 0
        self.logs: list[dict] = []
        self.losses: list[float] = []
        self.model_info: dict = {}

    def install(self) -> Probe:
        """Count the tokens of every micro-batch the Trainer trains on."""
        original = Trainer.training_step
        probe = self

        def training_step(self, model, inputs, *args, **kwargs):
            labels, ids = inputs.get("labels"), inputs.get("input_ids")
            completion = inputs.get("completion_mask")
            if labels is not None:
                probe.target_tokens += int((labels[..., 1:] != -100).sum())
            elif completion is not None:
                probe.target_tokens += int(completion[..., 1:].sum())
            if ids is not None:
                probe.rows += ids.size(0)
                probe.positions += ids.numel()
                probe.tokens += int((ids != probe.pad_token_id).sum())
            return original(self, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.t0 = time.perf_counter()
        if model is not None:
            params = list(model.parameters())
            self.model_info = {
                "dtype": str(params[0].dtype),
                "parameters": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            }

    def on_step_end(self, args, state, control, **kwargs):
        self.t_last = time.perf_counter()
        self.steps = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def write(self, path: str | Path, **extra) -> None:
        result = {
            "train_s": (self.t_last or 0.0) - (self.t0 or 0.0),
            "steps": self.steps,
            "target_tokens": self.target_tokens,
            "tokens": self.tokens,
            "rows": self.rows,
            "positions": self.positions,
            "losses": self.losses,
            "logs": self.logs,
            "model": self.model_info,
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            **extra,
        }
        Path(path).write_text(json.dumps(result, indent=2))


def trainer_settings(spec: dict) -> dict:
    """The Hugging Face Trainer settings of both peers' runs, from run.py's spec: its steps,
    batch, learning rate and seed; cosine without warmup, no weight decay, clipping 1.0, float32,
    no workers, a log row every step, no checkpoints, no evaluation, no reporting."""
    return {
        "output_dir": spec["output_dir"],
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["micro"],
        "gradient_accumulation_steps": spec["accum"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": spec["seed"],
        "bf16": False,
        "fp16": False,
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
    }
