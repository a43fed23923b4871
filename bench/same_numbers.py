"""Same numbers before and after a change of the training code: the demo's first steps run with
lockstep at a git revision (`--before`, checked out into a temporary worktree) and with this
checkout, on 1 and on 2 processes, alternately; the losses, gradient norms and batch hashes of
every logged step must be bit-identical, and the speed (tokens/s of the training loop) is
reported side by side.

    .venv/bin/python bench/same_numbers.py --before REV [--steps 60] [--repeats 2]

Writes bench/same_numbers.json; exits 1 when any number differs. Both versions run with the same
OMP_NUM_THREADS (1 unless set): CPU sums depend on the thread count.

`--rel-tol R` is for a change that reorders floating-point sums on purpose (a new attention
kernel, other micro-batch shapes): the step, lr, batch hash and token counts must still be
identical, and the loss and eval loss may differ by at most R relative; the largest relative
difference of each, and of the gradient norm (reported, not judged: a norm over every weight's
gradient moves more than the loss when float sums are reordered), is reported. Whatever the tolerance, the report also compares this
checkout on 1 process with 2 processes (the same R): the loss must not depend on the world size.
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
FLOATS = ("loss", "grad_norm")  # may move with the order of float sums (--rel-tol)
JUDGED = ("loss", "eval_loss")  # what --rel-tol bounds; the gradient norm is only reported


def largest_differences(a: dict, b: dict) -> dict[str, float] | None:
    """The largest relative difference of each float of two runs' rows (and eval rows), or
    None where anything else differs (steps, lr, batch hashes, token counts, row counts)."""
    rows = list(zip(a["rows"], b["rows"], strict=False)) + [
        ({"eval_loss": x["eval_loss"]}, {"eval_loss": y["eval_loss"]})
        for x, y in zip(a["eval"], b["eval"], strict=False)
    ]
    if len(a["rows"]) != len(b["rows"]) or len(a["eval"]) != len(b["eval"]):
        return None
    worst: dict[str, float] = {}
    for x, y in rows:
        for k in x:
            if k in (*FLOATS, "eval_loss"):
                rel = abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-30)
                worst[k] = max(worst.get(k, 0.0), rel)
            elif x[k] != y[k]:
                return None
    return worst


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
    ap.add_argument("--rel-tol", type=float, default=0.0,
                    help="largest relative difference of loss, grad norm, eval loss (0: bits)")  # fmt: skip
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
        worst = [largest_differences(runs[0], r) for r in runs[1:]]
        within = agrees(worst, args.rel_tol)
        same &= identical or within
        speed = {n: statistics.median(r["tokens_per_s"] for r in by[n]) for n in trees}
        report[procs] = {
            "identical": identical,
            "largest_rel_diff": merged(worst),
            "logged_rows": len(runs[0]["rows"]),
            "tokens_per_s": {n: round(v, 1) for n, v in speed.items()},
            "after_over_before": round(speed["after"] / speed["before"], 3),
        }
        verdict = "bit-identical" if identical else describe(merged(worst), within, args.rel_tol)
        print(f"{procs} process(es): {len(runs[0]['rows'])} logged rows {verdict}; tokens/s "
              f"before {speed['before']:,.0f}, after {speed['after']:,.0f} "
              f"({speed['after'] / speed['before']:.2f}x)")  # fmt: skip
    worlds = [largest_differences(results["1"]["after"][0], r) for r in results["2"]["after"]]
    within = agrees(worlds, args.rel_tol)
    same &= within
    report["1_vs_2_processes"] = {"largest_rel_diff": merged(worlds), "within": within}
    print(f"this checkout, 1 vs 2 processes: {describe(merged(worlds), within, args.rel_tol)}")
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = {
        "before": args.before, "after": head, "steps": args.steps, "repeats": args.repeats,
        "rel_tol": args.rel_tol, "threads": os.environ.get("OMP_NUM_THREADS", "1"), "machine": platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "results": report,
    }  # fmt: skip
    (ROOT / "bench" / "same_numbers.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if same else 1


def agrees(worst: list[dict | None], tol: float) -> bool:
    """Every comparison has the same steps and counts, and losses within `tol` relative."""
    return all(w is not None and all(v <= tol for k, v in w.items() if k in JUDGED) for w in worst)


def merged(worst: list[dict | None]) -> dict[str, float] | str:
    """The largest relative difference of each float over several comparisons."""
    if any(w is None for w in worst):
        return "steps, lr, batch hashes or token counts differ"
    out: dict[str, float] = {}
    for w in worst:
        for k, v in w.items():
            out[k] = max(out.get(k, 0.0), v)
    return {k: float(f"{v:.3g}") for k, v in out.items()}


def describe(worst: dict | str, within: bool, tol: float) -> str:
    if isinstance(worst, str):
        return f"DIFFER: {worst}"
    shown = ", ".join(f"{k} {v:.2g}" for k, v in worst.items())
    return f"{'within' if within else 'NOT within'} {tol:g} relative (largest: {shown})"


if __name__ == "__main__":
    sys.exit(main())
