"""Reliability trials: kill -9 at random points, resume, and compare with an uninterrupted run.

    .venv/bin/python bench/reliability.py [--kills 20] [--group-kills 5] [--seed 0]

1. Kill trials. One reference run trains 12 steps on the built-in tiny model with a checkpoint
   after every step. Each trial starts the same run in a fresh folder and SIGKILLs it at a
   random moment: half of the trials at a random time into training, half while a checkpoint is
   being written (the moment a `.tmp-step-*` folder appears). It then runs the same command
   again, which resumes from the newest complete checkpoint. The trial passes when the resumed
   run ends with the same per-step losses, batch hashes, gradient norms and final weights as
   the reference, bit for bit, and no incomplete checkpoint is left.
2. Process-group kills. A 2-process run (torchrun, gloo) is started in a process group of its
   own and, once training, the whole group gets SIGKILL (what a closed terminal or a job
   scheduler does). The trial passes when no training worker is alive 5 s later.

Prints one line per trial and a summary, writes bench/reliability.json, exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_train.jsonl"
STEPS = 12


def config(folder: Path, **extra) -> Path:
    cfg = {
        "output_dir": str(folder / "out"),
        "seed": 3,
        "model": {"path": "builtin:tiny"},
        "data": {
            "train": [{"path": str(DATA), "format": "alpaca"}],
            "max_length": 64,
            "cache_dir": str(folder / "cache"),
        },  # fmt: skip
        "batch": {"global_size": 8, "micro_size": 4},
        "train": {"max_steps": STEPS},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 1, "keep_last": 2},
        "log": {"every_steps": 1},
        **extra,
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lockstep(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lockstep", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


def outcome(out: Path) -> dict:
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    weights = load_file(out / "final" / "model.safetensors")
    return {
        "steps": [r["step"] for r in rows],
        "rows": [(r["loss"], r["batch_sha"], r["grad_norm"]) for r in rows],
        "weights": {k: v.numpy().tobytes() for k, v in weights.items()},
    }


def kill_trial(
    folder: Path, reference: dict, rng: random.Random, in_save: bool, span: float
) -> tuple[bool, str]:
    """`span`: seconds the reference run trained; a kill at a random time falls inside it."""
    cfg = config(folder)
    proc = lockstep("train", str(cfg))
    ckpts, metrics = folder / "out" / "checkpoints", folder / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    if in_save:  # the moment a checkpoint write is under way, after a random number of steps
        after = rng.randint(1, STEPS - 2)
        while proc.poll() is None and time.monotonic() < deadline:
            rows = metrics.read_text().count("\n") if metrics.is_file() else 0
            if (
                rows >= after
                and ckpts.is_dir()
                and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
            ):
                break
            time.sleep(0.001)
        where = f"inside a checkpoint write after step >= {after}"
    else:  # a random time once training runs
        while proc.poll() is None and not metrics.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        delay = rng.uniform(0.0, span)
        time.sleep(delay)
        where = f"{delay:.2f} s into training"
    if proc.poll() is not None:
        return False, f"the run ended before the kill ({where}); rc {proc.returncode}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = lockstep("train", str(cfg))
    _, err = resumed.communicate(timeout=300)
    if resumed.returncode != 0:
        return False, f"killed {where}; resume failed: {err.strip().splitlines()[-1:]}"
    got = outcome(folder / "out")
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    same = got == reference and not leftovers
    resumed_from = next((line for line in err.splitlines() if "resuming from" in line), "")
    how = resumed_from.split("resuming from")[-1].strip() or "a fresh start (no checkpoint yet)"
    return same, f"killed {where}; resumed from {how}; " + (
        "identical" if same else f"DIFFERENT (leftovers {leftovers})"
    )


def workers_of(cfg: Path) -> list[int]:
    """The training workers of this config (torchrun sets RANK in their environment)."""
    ps = subprocess.run(["pgrep", "-f", f"lockstep.train {cfg}"], capture_output=True, text=True)
    found = []
    for pid in map(int, ps.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"RANK=") for e in env):
            found.append(pid)
    return found


def group_kill_trial(folder: Path) -> tuple[bool, str]:
    cfg = config(folder, train={"max_steps": 100000}, launch={"timeout_s": 30})
    proc = lockstep("train", str(cfg), "--nproc-per-node", "2", start_new_session=True)
    metrics = folder / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not metrics.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    before = len(workers_of(cfg))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    gone = time.monotonic() + 5
    while workers_of(cfg) and time.monotonic() < gone:
        time.sleep(0.1)
    left = workers_of(cfg)
    for pid in left:  # leave nothing behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    return not left and before == 2, f"{before} workers training; {len(left)} alive 5 s after"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--group-kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lockstep-reliability-"))
    results: dict = {"kills": [], "group_kills": []}
    try:
        ref = work / "reference"
        ref.mkdir()
        proc = lockstep("train", str(config(ref)))
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        reference = outcome(ref / "out")
        rows = (ref / "out" / "metrics.jsonl").read_text().splitlines()
        span = json.loads(rows[-1])["elapsed_s"]
        for i in range(args.kills):
            folder = work / f"kill-{i}"
            folder.mkdir()
            ok, what = kill_trial(folder, reference, rng, i % 2 == 1, span)
            results["kills"].append({"ok": ok, "what": what})
            print(f"kill {i + 1:2d}/{args.kills}: {'ok  ' if ok else 'FAIL'} {what}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        for i in range(args.group_kills):
            folder = work / f"group-{i}"
            folder.mkdir()
            ok, what = group_kill_trial(folder)
            results["group_kills"].append({"ok": ok, "what": what})
            print(f"group kill {i + 1}/{args.group_kills}: {'ok  ' if ok else 'FAIL'} {what}",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = {k: sum(r["ok"] for r in v) for k, v in results.items()}
    print(f"kill -9 and resume: {passed['kills']}/{args.kills} bit-identical; "
          f"process-group kill: {passed['group_kills']}/{args.group_kills} left no worker")  # fmt: skip
    (HERE / "reliability.json").write_text(json.dumps(results, indent=1) + "\n")
    ok = passed["kills"] == args.kills and passed["group_kills"] == args.group_kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
