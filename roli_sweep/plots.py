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
    return _save(fig, path)


def plot_importance(importances: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars of hyperparameter importances (fractions summing to 1, Optuna's fANOVA); writes a PNG."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.5 * len(names) + 1.5), dpi=120)
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for best val robust accuracy (fANOVA)")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_metric_vs_lr(points: Sequence[tuple[float, float, str, bool]], path: Path, title: str,
                      ylabel: str = "best val robust accuracy") -> Path:
    """``(lr, value, group, completed)`` per trial on a log lr axis, one colour per group (RoLI / RanLI);
    filled markers for completed trials, hollow for those ASHA stopped; writes a PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    colours = {"roli": "tab:red", "random": "tab:blue"}
    labels = {"roli": "RoLI", "random": "RanLI"}
    for group in sorted({p[2] for p in points}):
        for completed in (True, False):
            chosen = [p for p in points if p[2] == group and p[3] == completed]
            if chosen:
                colour = colours.get(group, "0.4")
                ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], edgecolors=colour,
                           facecolors=colour if completed else "none",
                           label=f"{labels.get(group, group)} ({'completed' if completed else 'stopped by ASHA'})")
    ax.set_xscale("log")
    ax.set_xlabel("finetune lr")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_paired_seeds(comparison, path: Path, title: str) -> Path:
    """The confirmation seed by seed (a :class:`roli_sweep.comparison.Comparison`): one panel per metric (test clean,
    test robust), each arm's rank-1 configuration a column of points, one line per seed joining its arms' values,
    the arm's mean as a bar; writes a PNG."""
    arms = [arm for arm in comparison.arms if arm.rank == 1]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=120)
    for ax, metric in zip(axes, ("test_clean_acc", "test_robust_acc")):
        for seed in comparison.seeds:
            xs = [i for i, arm in enumerate(arms) if seed in arm.runs]
            ys = [getattr(arms[i].runs[seed], metric) for i in xs]
            ax.plot(xs, ys, "o-", color="0.5", alpha=0.7)
            if ys:
                ax.annotate(f"seed {seed}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 0), fontsize=7)
        for i, arm in enumerate(arms):
            found = arm.mean_std(metric)
            if found:
                ax.hlines(found[0], i - 0.2, i + 0.2, color="tab:red", linewidth=2)
        ax.set_xticks(range(len(arms)), [arm.arm for arm in arms])
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_ylabel(metric.replace("_acc", " accuracy").replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: per seed (lines), mean (bars)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates, sorted by the first."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


BACKBONE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
INIT_MARKERS = {"random": "o", "roli": "^"}


def plot_clean_vs_robust(cells, probes, path: Path) -> Path:
    """Study plot: test clean vs robust accuracy (mean over seeds) of every cell at its own lr, one panel per
    target, with the Pareto front of each panel and the stage-1 probes as stars; writes a PNG."""
    targets = sorted({c.target for c in cells})
    backbones = sorted({c.backbone for c in cells})
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.8), dpi=120, squeeze=False)
    for ax, target in zip(axes[0], targets):
        points = []
        for c in (c for c in cells if c.target == target):
            color = BACKBONE_COLORS[backbones.index(c.backbone) % len(BACKBONE_COLORS)]
            for init, stats in c.own.items():
                if not stats["test_robust_acc"].n:
                    continue
                xy = (stats["test_clean_acc"].mean, stats["test_robust_acc"].mean)
                points.append(xy)
                ax.scatter(*xy, color=color, marker=INIT_MARKERS[init], s=36)
                ax.annotate(c.method, xy, textcoords="offset points", xytext=(3, 3), fontsize=6)
        for backbone in backbones:
            stat = probes.get((backbone, target))
            if stat and stat["test_robust_acc"].n:
                xy = (stat["test_clean_acc"].mean, stat["test_robust_acc"].mean)
                points.append(xy)
                ax.scatter(*xy, color=BACKBONE_COLORS[backbones.index(backbone) % len(BACKBONE_COLORS)],
                           marker="*", s=120, edgecolor="black")
        front = _pareto(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:red", lw=1, label="Pareto front")
        for i, backbone in enumerate(backbones):
            ax.scatter([], [], color=BACKBONE_COLORS[i % len(BACKBONE_COLORS)], label=f"{backbone} backbone")
        for init, marker in INIT_MARKERS.items():
            ax.scatter([], [], color="0.4", marker=marker, label="RoLI" if init == "roli" else "RanLI")
        ax.scatter([], [], color="0.4", marker="*", s=120, label="linear probe (stage 1)")
        ax.set_xlabel("test clean accuracy")
        ax.set_ylabel("test robust accuracy (PGD)")
        ax.set_title(f"{target}: mean over seeds, own best lr", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def plot_paired_differences(cells, path: Path) -> Path:
    """Study plot: paired RoLI - RanLI test robust accuracy (points, mean +- std over seeds) per method, at
    each init's own lr over all seeds and over the seeds that did not choose the lr, one panel per
    (backbone, target); writes a PNG."""
    panels = sorted({(c.backbone, c.target) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120, squeeze=False, sharey=True)
    for ax, (backbone, target) in zip(axes[0], panels):
        chosen = [c for c in cells if (c.backbone, c.target) == (backbone, target)]
        xs = range(len(chosen))
        for offset, attr, label, color in ((-0.18, "diff_own", "own lr", "tab:blue"),
                                           (0.18, "diff_held_out", "own lr, held-out seeds", "tab:green")):
            stats = [getattr(c, attr)["test_robust_acc"] for c in chosen]
            ax.bar([x + offset for x in xs], [100 * s.mean if s.n else 0 for s in stats], width=0.36,
                   yerr=[100 * s.std for s in stats], color=color, label=label, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(list(xs), [c.method for c in chosen], rotation=45, fontsize=7)
        ax.set_title(f"{backbone} / {target}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("RoLI - RanLI test robust acc (points)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_backbone_comparison(cells, path: Path) -> Path:
    """Study plot: test robust accuracy (mean +- std over seeds, own lr) per method for each backbone and
    head init, one panel per target; writes a PNG."""
    targets = sorted({c.target for c in cells})
    backbones = sorted({c.backbone for c in cells})
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 3.8), dpi=120, squeeze=False, sharey=True)
    series = [(b, i) for b in backbones for i in ("random", "roli")]
    width = 0.8 / len(series)
    for ax, target in zip(axes[0], targets):
        methods = [c.method for c in cells if c.target == target and c.backbone == backbones[0]]
        for k, (backbone, init) in enumerate(series):
            stats = []
            for method in methods:
                match = [c for c in cells if (c.backbone, c.target, c.method) == (backbone, target, method)]
                stats.append(match[0].own[init]["test_robust_acc"] if match else None)
            ax.bar([x + (k - (len(series) - 1) / 2) * width for x in range(len(methods))],
                   [100 * s.mean if s and s.n else 0 for s in stats], width=width,
                   yerr=[100 * s.std if s else 0 for s in stats], capsize=2,
                   color=BACKBONE_COLORS[backbones.index(backbone) % len(BACKBONE_COLORS)],
                   alpha=0.55 if init == "random" else 1.0,
                   label=f"{backbone}, {'RoLI' if init == 'roli' else 'RanLI'}")
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"{target}: robust vs standard source backbone", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test robust accuracy (%)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)
