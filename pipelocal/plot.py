"""``pipelocal plot RUN_DIR``: learning curves and per-stage utilisation of a run, as a PNG.

Reads the run's ``metrics.jsonl`` (one record per epoch) and draws three panels: train loss,
test accuracy (output and every local classifier), and each stage's busy fraction of the
epoch's wall time (pipelined runs only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory (runs/NAME) of a "
                                "run that finished at least one epoch")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise FileNotFoundError(f"{path} holds no epoch yet; plot after the first epoch")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into ``out`` (default: RUN_DIR/curves.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = _records(run_dir)
    epochs = [r["epoch"] for r in records]
    stages = sorted({k.split("/")[0] for r in records for k in r if k.endswith("/busy(s)")})
    fig, axes = plt.subplots(1, 3 if stages else 2, figsize=(15 if stages else 10, 4))
    axes[0].plot(epochs, [r["train/loss"] for r in records], label="output")
    for name in records[0].get("train/loss_local", {}):
        axes[0].plot(epochs, [r["train/loss_local"].get(name) for r in records], label=name,
                     alpha=0.6)
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(epochs, [100 * r["test/acc"] for r in records], label="output")
    for name in records[0].get("test/acc_local", {}):
        axes[1].plot(epochs, [100 * r["test/acc_local"][name] for r in records], label=name,
                     alpha=0.6)
    axes[1].set(title="test accuracy (%)", xlabel="epoch")
    for stage in stages:
        busy = [100 * r[f"{stage}/busy(s)"] / max(r[f"{stage}/wall(s)"], 1e-9) for r in records]
        axes[2].plot(epochs, busy, label=stage)
    if stages:
        axes[2].set(title="stage busy (% of epoch wall time)", xlabel="epoch", ylim=(0, 105))
    for ax in axes:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    path = Path(out) if out else run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
