"""Same numbers before and after a change of the training code: the demo's first steps run with
lockstep at a git revision (`--before`, checked out into a temporary worktree) and with this
checkout, on 1 and on 2 processes, alternately; the losses, gradient norms and batch hashes of
every logged step must be bit-identical, and the speed (tokens/s of the training loop) is
reported side by side.

    .venv/bin/python bench/same_numbers.py --before REV [--steps 60] [--repeats 2]

Writes bench/same_numbers.json; exits 1 when any number differs. Both versions run with the same
OMP_NUM_THREADS (1 unless set): CPU sums depend on the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "grad_norm", "lr", "batch_sha", "tokens", "target_tokens")


def run_demo(src: Path, procs: int, steps: int, out: Path) -> dict:
    """The demo's first `steps` steps with the lockstep in `src`; its rows and its speed."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    args = [
        sys.executable, "-m", "lockstep", "train", "demo", f"output_dir={out}",
        f"train.max_steps={steps}", "log.every_steps=1", "eval.show=0", "checkpoint.resume=never",
        "checkpoint.overwrite=true",
    ]  # fmt: skip
    if procs > 1:
        args += ["--nproc-per-node", str(procs)]
    res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=out.parent)
    if res.returncode:
        raise SystemExit(f"{src}: the demo failed on {procs} process(es):\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    took = train[-1]["elapsed_s"]
    return {
        "rows": [{k: r[k] for k in COMPARED} for r in train],
        "eval": [r for r in rows if "eval_loss" in r],
        "tokens_per_s": sum(r["tokens"] for r in train) / took if took else 0.0,
        "loop_s": took,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the git revision to compare against")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lockstep-same-"))
    old_tree = work / "before"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.before],
        check=True, capture_output=True,
    )  # fmt: skip
    trees = {"before": old_tree / "src", "after": ROOT / "src"}
    results: dict = {}
    try:
        for procs in (1, 2):
            for repeat in range(args.repeats):
                for name, src in trees.items():
                    out = work / f"{name}-{procs}-{repeat}"
                    results.setdefault(f"{procs}", {}).setdefault(name, []).append(
                        run_demo(src, procs, args.steps, out)
                    )
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    report, same = {}, True
    for procs, by in results.items():
        runs = by["before"] + by["after"]
        identical = all(r["rows"] == runs[0]["rows"] and r["eval"] == runs[0]["eval"] for r in runs)
        same &= identical
        speed = {n: statistics.median(r["tokens_per_s"] for r in by[n]) for n in trees}
        report[procs] = {
            "identical": identical,
            "logged_rows": len(runs[0]["rows"]),
            "tokens_per_s": {n: round(v, 1) for n, v in speed.items()},
            "after_over_before": round(speed["after"] / speed["before"], 3),
        }
        print(f"{procs} process(es): {len(runs[0]['rows'])} logged rows "
              f"{'bit-identical' if identical else 'DIFFER'}; tokens/s before "
              f"{speed['before']:,.0f}, after {speed['after']:,.0f} "
              f"({speed['after'] / speed['before']:.2f}x)")  # fmt: skip
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = {
        "before": args.before, "after": head, "steps": args.steps, "repeats": args.repeats,
        "threads": os.environ.get("OMP_NUM_THREADS", "1"), "machine": platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "results": report,
    }  # fmt: skip
    (ROOT / "bench" / "same_numbers.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
