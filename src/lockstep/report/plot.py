"""loss.png from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from lockstep.report.metrics import read


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    rows = [r for r in read(metrics_path) if "loss" in r]
    pairs = any("rewards/margin" in r for r in rows)  # a preference run: its rewards beside
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(12 if pairs else 7, 4), dpi=110)
    ax = axes[0] if pairs else axes
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.2)
    evals = [r for r in read(metrics_path) if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval loss", lw=1.2, ms=3)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer pairs)" if pairs else
                  "loss (token-normalised cross entropy)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    if pairs:
        right = axes[1]
        for key in ("rewards/margin", "rewards/accuracy"):
            right.plot([r["step"] for r in rows], [r[key] for r in rows], label=key, lw=1.2)
            if evals and f"eval_{key}" in evals[0]:
                right.plot([r["step"] for r in evals], [r[f"eval_{key}"] for r in evals], "o-",
                           label=f"eval {key}", lw=1.2, ms=3)  # fmt: skip
        right.set_xlabel("optimizer step")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
