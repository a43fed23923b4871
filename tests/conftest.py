"""Shared helpers: run the real CLI in a subprocess, write small real data and configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src" / "lockstep" / "examples"  # the shipped example configs and demo data
DEMO_DATA = EXAMPLES / "data" / "demo_train.jsonl"


# a subprocess timeout only catches a hang: a busy machine makes runs many times slower
HANG_S = 1800.0


def pytest_configure(config) -> None:
    """Every run of the suite uses one CPU thread per process unless OMP_NUM_THREADS is set:
    lockstep's own choice follows the machine's load (lockstep.threads), which would make the
    suite's speed depend on other work and let two runs that a test compares bit for bit use
    different counts. tests/test_threads.py removes it to test that choice."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(
    *args: str, env: dict[str, str | None] | None = None, timeout: float = HANG_S, cwd=None
):
    """Run `python -m lockstep ARGS` as a user would; return the CompletedProcess. `env` is added
    to this environment; a name given None is removed."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop(
        "LOCKSTEP_TRACEBACK", None
    ) if env is None or "LOCKSTEP_TRACEBACK" not in env else None
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "lockstep", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or ROOT,
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def small_config(tmp_path: Path, data_file: Path | None = None, **sections) -> Path:
    """A quick config on the built-in tiny model; `sections` are merged over the defaults."""
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "seed": 7,
        "model": {"path": "builtin:tiny"},
        "data": {
            "train": [{"path": str(data_file or DEMO_DATA), "format": "alpaca"}],
            "max_length": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "batch": {"global_size": 8, "micro_size": 4},
        "train": {"max_steps": 3},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "log": {"every_steps": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    records = [
        {
            "instruction": "Uppercase the words.",
            "input": f"word{i} river",
            "output": f"WORD{i} RIVER",
        }
        for i in range(24)
    ]
    return write_jsonl(tmp_path / "small.jsonl", records)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (the README's test command does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
