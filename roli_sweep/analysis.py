"""What a finished sweep says about its search space, computed over its records (no MLflow, no printing): the
Pareto front (two objectives), which ranges the best trials pushed against (:mod:`roli_sweep.edges`), which
hyperparameters mattered (Optuna's fANOVA on the sweep's stored study) and how validation robust accuracy depends
on the learning rate, RoLI against RanLI. Each is one function registered with :func:`register_analysis` that
returns a :class:`~roli_sweep.records.Finding`; :func:`roli_sweep.tracking.log_sweep_end` logs every finding and
:func:`roli_sweep.console.print_sweep_end` prints them, so a new analysis is one function here.
References: Optuna ``optuna.importance`` docs (fANOVA, Hutter et al., ICML 2014).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna

from roli_sweep.config import ParameterSpec
from roli_sweep.edges import edge_warnings
from roli_sweep.plots import plot_importance, plot_metric_vs_lr, plot_pareto
from roli_sweep.records import Finding, SweepOutcome, TrialRow, TrialState

MIN_COMPLETED = 3
"""fANOVA needs a few completed trials; below this no importance is computed."""


def hyperparameter_importance(storage_url: str, study_name: str, objective: int = 0) -> dict[str, float] | None:
    """fANOVA importances (fractions summing to 1, most important first) of the sampled parameters for the
    sweep's objective, over its COMPLETE Optuna trials; None with fewer than :data:`MIN_COMPLETED` of them,
    no parameter that varies, or one value for all. ``objective``: which value of a multi-objective study
    (1 = val robust)."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varying = {k for t in completed for k in t.params if len({repr(u.params.get(k)) for u in completed}) > 1}
    values = {t.values[objective] if len(study.directions) > 1 else t.value for t in completed}
    if len(completed) < MIN_COMPLETED or not varying or len(values) < 2:
        return None  # fANOVA needs trials that differ in both their parameters and their values
    target = (lambda t: t.values[objective]) if len(study.directions) > 1 else None
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=sorted(varying), target=target)


def lr_points(rows: Sequence[TrialRow], base_head_init: str) -> list[tuple[float, float, str, bool]]:
    """``(lr, best val robust, head_init, completed)`` of every trial that reported one and sampled ``finetune.lr``."""
    return [(float(r.sampled["finetune.lr"]), float(r.val_robust_acc), str(r.sampled.get("finetune.head_init",
             base_head_init)), r.status == TrialState.COMPLETED)
            for r in rows if "finetune.lr" in r.sampled and r.val_robust_acc is not None]


@dataclass(frozen=True)
class SweepFacts:
    """What the analyses read besides the outcome: the sampled parameters, the stored Optuna study, the base head
    init and whether the sweep had two objectives."""

    parameters: dict[str, ParameterSpec]
    study_url: str
    base_head_init: str
    multi_objective: bool


Analysis = Callable[[SweepOutcome, SweepFacts], "Finding | None"]
ANALYSES: list[Analysis] = []
"""The end-of-sweep analyses, in the order they run, log and print."""


def register_analysis(analysis: Analysis) -> Analysis:
    """Decorator: run ``analysis(outcome, facts) -> Finding | None`` at the end of every finished sweep."""
    ANALYSES.append(analysis)
    return analysis


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@register_analysis
def pareto(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Multi-objective sweeps: the completed trials no other beats on both val clean and val robust accuracy."""
    if not facts.multi_objective or not outcome.completed():
        return None
    front = outcome.pareto_front()
    columns = ["trial", *[k.split(".")[-1] for k in facts.parameters], "val clean", "val robust"]
    rows = [[r.trial_id, *[_short(r.sampled.get(k)) for k in facts.parameters], f"{r.val_clean_acc:.3f}",
             f"{r.val_robust_acc:.3f}"] for r in front]
    return Finding("pareto", table=("Pareto front of the completed trials: val clean vs val robust accuracy (plot: "
                                    "pareto_front.png in the parent run)", columns, rows),
                   figure="pareto_front.png",
                   plot=lambda path: plot_pareto(outcome.completed(), front, path, f"sweep {outcome.name}"))


@register_analysis
def range_edges(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Parameters whose best completed trials sit at an edge of their range (:mod:`roli_sweep.edges`)."""
    edges = edge_warnings(facts.parameters, [(r.sampled, r.val_robust_acc) for r in outcome.completed()])
    if not edges:
        return None
    return Finding("range_edges", tags={f"search_space.edge.{w.parameter}": w.message for w in edges},
                   warnings=[("search-space edge", w.message) for w in edges])


@register_analysis
def importance(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """fANOVA importance of each sampled parameter (:func:`hyperparameter_importance`)."""
    found = hyperparameter_importance(facts.study_url, outcome.name, objective=1 if facts.multi_objective else 0)
    if not found:
        return None
    return Finding("importance", metrics={f"importance.{k}": float(v) for k, v in found.items()},
                   table=("hyperparameter importance for best val robust accuracy (Optuna fANOVA, completed trials; "
                          "importance.png and val_robust_vs_lr.png in the parent run)", ["parameter", "importance"],
                          [[k, f"{v:.2f}"] for k, v in found.items()]),
                   figure="importance.png", plot=lambda path: plot_importance(found, path, f"sweep {outcome.name}"))


@register_analysis
def robust_vs_lr(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Best val robust accuracy against the lr, RoLI red and RanLI blue, hollow for ASHA-stopped trials."""
    points = lr_points(outcome.rows, facts.base_head_init)
    if not points:
        return None
    return Finding("robust_vs_lr", figure="val_robust_vs_lr.png",
                   plot=lambda path: plot_metric_vs_lr(points, path, f"sweep {outcome.name}"))


def analyse_sweep(outcome: SweepOutcome, facts: SweepFacts) -> None:
    """Every registered analysis over ``outcome``'s trials; what they found goes to ``outcome.findings``."""
    outcome.findings = [found for analysis in ANALYSES if (found := analysis(outcome, facts)) is not None]
