"""Figures logged to MLflow (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class ScoredTrial(Protocol):
    trial_id: str
    val_clean_acc: float
    val_robust_acc: float


def plot_pareto(trials: Sequence[ScoredTrial], front: Sequence[ScoredTrial], path: Path, title: str) -> Path:
    """Scatter of val clean vs val robust accuracy (fractions in [0, 1]) with the Pareto front drawn; writes a PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    ax.scatter([t.val_clean_acc for t in trials], [t.val_robust_acc for t in trials], color="0.6", label="trials")
    ax.plot([t.val_clean_acc for t in front], [t.val_robust_acc for t in front], "o-", color="tab:red",
            label="Pareto front")
    for t in front:
        ax.annotate(t.trial_id, (t.val_clean_acc, t.val_robust_acc), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("val clean accuracy")
    ax.set_ylabel("val robust accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
