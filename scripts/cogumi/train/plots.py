"""Loss curve PNG from train_log.jsonl (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.train.trainlog import read_log

log = logging.getLogger(__name__)


def plot_loss(log_path: Path, out_png: Path, *, title: str | None = None) -> Path:
    """Write the training loss, the held-out eval_loss where logged, and the learning rate on a second axis against
    the step; returns out_png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = read_log(Path(log_path))
    rows = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "eval_loss" in r]
    if not rows:
        raise UserError(f"no training log rows in {log_path}", where=str(log_path),
                        fix="train first (`make train PHASE=...`); the log is written every train.log_every steps")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color="tab:green", marker="o",
                markersize=3, label="eval_loss (held out)")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.5, linewidth=1, label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.set_title(title or Path(log_path).parent.name)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    log.info("loss curve: %s", out_png)
    return out_png
