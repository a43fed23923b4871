"""loss.png from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from lockstep.report.metrics import read


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    rows = [r for r in read(metrics_path) if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.2)
    evals = [r for r in read(metrics_path) if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval loss", lw=1.2, ms=3)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-normalised cross entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
