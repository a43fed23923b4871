"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, fed by report.metrics.

log.trackers (and log.tensorboard) name them. Rank 0 alone opens them (training/build.py); the
metrics writer hands each the numbers of every metrics.jsonl row, at the row's step. A tracker
run records the resolved config, the seed and the config hash as its parameters. Its id goes
into every checkpoint's state.json ("trackers"), so a resumed run continues the same tracker
run. Each tracker is an optional extra, imported only when chosen; check_installed names the
missing ones before any process starts.

Offline: W&B honours WANDB_MODE (offline: the run's files under OUTPUT/wandb/, for `wandb sync`
later); MLflow logs to MLFLOW_TRACKING_URI, else to a file store in OUTPUT/mlruns.
"""

from __future__ import annotations

import importlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from lockstep import DISTRIBUTION
from lockstep.config import LogConfig, RunConfig, config_hash, to_dict
from lockstep.errors import ConfigError, TrainingError, first_line

# tracker -> (the module it needs, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow")}  # fmt: skip
MLFLOW_PARAM_LENGTH = 500  # MLflow's smallest limit on a parameter's value (older servers)
MLFLOW_BATCH = 100  # MLflow's limit on parameters per log_batch call
ENDED = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}  # MLflow's words
W_EXIT = {"finished": 0, "failed": 1, "stopped": 143}  # W&B's exit code of a run


class Tracker(Protocol):
    """One tracker run: `name` (as in log.trackers), `run_id` ("" when it has none), `where`
    (its run and where it is written, in words)."""

    name: str
    run_id: str
    where: str

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


def chosen(log: LogConfig) -> list[str]:
    """The trackers log.trackers and log.tensorboard name, each once, in their order."""
    names = list(log.trackers) + (["tensorboard"] if log.tensorboard else [])
    return list(dict.fromkeys(names))


def check_installed(log: LogConfig) -> None:
    """A chosen tracker whose package does not import: one ConfigError naming the pip install,
    before any work."""
    for name in chosen(log):
        module, extra = NEEDS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            field = "log.tensorboard=true" if name == "tensorboard" else f"log.trackers: {name}"
            raise ConfigError(
                f"{field} needs the {module} package ({first_line(e)}): "
                f"pip install '{DISTRIBUTION}[{extra}]' (or pip install {module})"
            ) from None


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, less its step (text such as batch_sha is not a scalar)."""
    return {
        k: v for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }  # fmt: skip


def open_all(cfg: RunConfig, out: Path, run_ids: Mapping[str, str]) -> list[Tracker]:
    """Rank 0: the chosen trackers' runs, continuing those of `run_ids` ({name: id}, from the
    checkpoint a run resumes) and new ones otherwise."""
    opened: list[Tracker] = []
    try:
        for name in chosen(cfg.log):
            if name == "tensorboard":
                opened.append(TensorBoard(out / "tensorboard"))
            elif name == "wandb":
                opened.append(WandB(cfg, out, run_ids.get("wandb", "")))
            else:
                opened.append(MLflow(cfg, out, run_ids.get("mlflow", "")))
    except BaseException:
        close_all(opened, "failed")
        raise
    return opened


def describe(trackers: Iterable[Tracker]) -> str:
    """The start-up line's words: `wandb run 3f9c2a1b0d4e (new, offline) in OUTPUT/wandb; ...`."""
    return "; ".join(f"{t.name} {t.where}" for t in trackers)


def close_all(trackers: Iterable[Tracker], status: str) -> None:
    """End each tracker's run as `status`: finished, failed, stopped."""
    for tracker in trackers:
        tracker.close(status)


def run_name(cfg: RunConfig) -> str:
    """log.run_name, else the output folder's name."""
    return cfg.log.run_name or Path(cfg.output_dir).resolve().name


def parameters(cfg: RunConfig) -> dict[str, Any]:
    """What a tracker run records of the run: the resolved config, its seed and config hash."""
    return {**to_dict(cfg), "seed": cfg.seed, "config_hash": config_hash(cfg)}


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    """TensorBoard event files in `folder`: train/NAME and eval/NAME scalars."""

    name, run_id = "tensorboard", ""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.where = str(folder)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run in project log.project, its files under OUTPUT/wandb/. Rows are
    logged with their step as the `step` metric every chart is drawn against (W&B's own step
    counter only counts calls, and restarts in an offline run that resumes)."""

    name = "wandb"

    def __init__(self, cfg: RunConfig, out: Path, run_id: str) -> None:
        import wandb

        self.run_id = run_id or secrets.token_hex(6)  # W&B ids: lowercase letters, digits
        try:
            self.run = wandb.init(
                project=cfg.log.project, name=run_name(cfg), id=self.run_id, resume="allow",
                dir=str(out), config=parameters(cfg),
                settings=wandb.Settings(console="off", silent=True),
            )  # fmt: skip
        except Exception as e:  # wandb's errors: no API key, no connection, ...
            raise TrainingError(
                f"log.trackers: wandb could not start its run: {first_line(e)} (or set "
                "WANDB_MODE=offline to keep the run in OUTPUT/wandb/; `wandb sync` uploads it)"
            ) from None
        self.run.define_metric("*", step_metric="step")
        resumed = "continued" if run_id else "new"
        self.where = f"run {self.run_id} ({resumed}, {self.run.settings.mode}) in {out / 'wandb'}"

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, "step": step})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=W_EXIT.get(status, 1))


class MLflow:
    """An MLflow run in experiment log.project. The store: MLFLOW_TRACKING_URI, else a file
    store in OUTPUT/mlruns (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true to write one; it is
    set for this default store only, when not set already). A resumed run's id that the store
    no longer holds starts a new run."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, out: Path, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            continued = self._continue(run_id)
            self.run_id = continued or self._start(cfg)
            self.where = f"run {self.run_id} ({'continued' if continued else 'new'}) at {uri}"
        except Exception as e:  # MLflow's errors: a store it cannot reach or write
            raise TrainingError(
                f"log.trackers: mlflow could not start its run at {uri}: {first_line(e)}"
            ) from None

    def _continue(self, run_id: str) -> str:
        if not run_id:
            return ""
        try:
            self.client.get_run(run_id)
        except Exception:  # gone from the store (another MLFLOW_TRACKING_URI, deleted)
            return ""
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _start(self, cfg: RunConfig) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(cfg.log.project)
        experiment = found.experiment_id if found else self.client.create_experiment(
            cfg.log.project
        )  # fmt: skip
        run_id = self.client.create_run(experiment, run_name=run_name(cfg)).info.run_id
        params = [
            Param(key, str(value)[:MLFLOW_PARAM_LENGTH])
            for key, value in flat(parameters(cfg)).items()
        ]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[i : i + MLFLOW_BATCH])
        return run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=ENDED.get(status, "FAILED"))
