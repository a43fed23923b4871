"""This machine's float32 matmul peak right now: the yardstick for run.py's achieved FLOP/s.

    .venv/bin/python bench/vs_peers/matmul_peak.py [--sizes 512 1024 2048] [--seconds 0.4]

Runs in lockstep's venv (torch only). For each size n it multiplies two random n x n float32
matrices (``torch.mm``, preallocated output) back to back for --seconds, --trials times, and
takes the best trial: 2 n^3 floating-point operations per product. It prints one JSON object:
``gflops`` (the best over all sizes), ``by_size`` (the best of each), ``threads`` (torch's
intra-op threads: the default, as every tool in the benchmark uses it, unless --threads) and
the torch version. It takes about trials x sizes x seconds (~5 s with the defaults).

This is the peak a dense GEMM reaches on these cores with this torch build (oneDNN / MKL), not
the cores' theoretical peak (clock x vector width x FMA units), which a 2-core machine shared
with other work does not reach; run.py measures it right before each training run, so a busy
phase of the machine lowers the peak and the training speed together.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_gflops(n: int, seconds: float, trials: int) -> float:
    """Best GFLOP/s of back-to-back n x n float32 matmuls over `trials` windows of `seconds`."""
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(2):  # warm-up: thread pool, kernel selection, caches
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            torch.mm(a, b, out=out)
            count += 1
        best = max(best, 2 * n**3 * count / elapsed / 1e9)
    return best


def measure(sizes: list[int], seconds: float, trials: int) -> dict:
    """The machine's float32 matmul peak: best GFLOP/s over sizes, and per size."""
    by_size = {str(n): round(best_gflops(n, seconds, trials), 1) for n in sizes}
    return {
        "gflops": max(by_size.values()),
        "by_size": by_size,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--seconds", type=float, default=0.4, help="length of one timed window")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.sizes, args.seconds, args.trials)))


if __name__ == "__main__":
    main()
