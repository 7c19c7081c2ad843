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

from roli_sweep.comparison import METRICS, compare, describe, markdown
from roli_sweep.config import SearchSpace, evaluation_attack
from roli_sweep.names import arm_label, case_key, study_name
from roli_sweep.edges import edge_warnings
from roli_sweep.plots import plot_importance, plot_metric_vs_lr, plot_paired_seeds, plot_pareto
from roli_sweep.records import Finding, SweepOutcome, TrialRow, TrialState, eps_fraction

MIN_COMPLETED = 3
"""fANOVA needs a few completed trials; below this no importance is computed."""


def hyperparameter_importance(storage_url: str, study_name: str, objective: int = 0) -> dict[str, float] | None:
    """fANOVA importances (fractions summing to 1, most important first) of the sampled parameters for the
    sweep's objective, over its COMPLETE Optuna trials; None with fewer than :data:`MIN_COMPLETED` of them,
    no parameter that varies, or one value for all. ``objective``: which value of a multi-objective study
    (1 = val robust)."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    shared = set.intersection(*(set(t.params) for t in completed)) if completed else set()  # a case's range: not all
    varying = {k for k in shared if len({repr(u.params[k]) for u in completed}) > 1}
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
    """What the analyses read besides the outcome: the search space, the stored Optuna studies and the
    confirmation's seeds."""

    space: SearchSpace
    study_url: str
    confirmation_seeds: list[int]

    @property
    def parameters(self):
        return self.space.parameters

    def arms(self) -> list[tuple[Any, str]]:
        """``(arm value, label)`` per arm (``[(None, "all trials")]`` without arms)."""
        return [(value, arm_label(self.space.arms, value)) for value in self.space.arm_values()]

    def in_arm(self, rows: Sequence[TrialRow], value: Any) -> list[TrialRow]:
        return [r for r in rows if self.space.in_arm(r.sampled, value)]


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
    if not facts.space.metric.multi_objective or not outcome.completed():
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
def arm_bests(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Each arm's best completed search trial (spaces with ``arms``): metrics ``best.<arm>.<metric>``."""
    if not facts.space.arms:
        return None
    rows, metrics = [], {}
    for value, label in facts.arms():
        best = max((r for r in facts.in_arm(outcome.completed(), value)), key=lambda r: r.val_robust_acc,
                   default=None)
        if best is None:
            rows.append([label, "-", "no completed trial", "-", "-", "-", "-"])
            continue
        settings = ", ".join(f"{k.split('.')[-1]} {_short(v)}" for k, v in best.sampled.items() if k != facts.space.arms)
        rows.append([label, best.trial_id, settings, *[f"{v:.3f}" if v is not None else "-" for v in (
            best.val_clean_acc, best.val_robust_acc, best.test_clean_acc, best.test_robust_acc)]])
        metrics.update({f"best.{label}.{k}": float(v) for k, v in (
            ("val_clean_acc", best.val_clean_acc), ("val_robust_acc", best.val_robust_acc),
            ("test_clean_acc", best.test_clean_acc), ("test_robust_acc", best.test_robust_acc)) if v is not None})
    counts = {label: len(facts.in_arm(outcome.rows, value)) for value, label in facts.arms()}
    return Finding("arm_bests", metrics=metrics | {f"trials.{label}": float(n) for label, n in counts.items()},
                   table=("each arm's best search trial by val robust accuracy (one seed; the confirmation below "
                          "reruns it over more) - trials per arm: " + ", ".join(f"{k} {n}" for k, n in counts.items()),
                          ["arm", "trial", "settings", "val clean", "val robust", "test clean", "test robust"], rows))


@register_analysis
def range_edges(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Parameters whose best completed trials sit at an edge of their range (:mod:`roli_sweep.edges`), per arm, and
    a conditional parameter per case (its message names the arm: "RoLI's finetune.lr: range ...")."""
    edges, tags = [], {}
    space = facts.space
    for value, label in facts.arms():
        rows = facts.in_arm(outcome.completed(), value)
        for key in space.parameters:
            if key == space.arms:
                continue
            for condition, spec in space.conditions(key):
                given = next(iter(condition), None)
                if given is not None and given == space.arms and case_key(condition[given]) != case_key(value):
                    continue  # the case of another arm
                mine = [r for r in rows if all(case_key(r.sampled.get(k)) == case_key(v) for k, v in condition.items())]
                where = (f"{label}'s " if space.arms else "") + "".join(
                    f"({k.split('.')[-1]} {case_key(v)}) " for k, v in condition.items() if k != space.arms)
                for warning in edge_warnings({key: spec}, [(r.sampled, r.val_robust_acc) for r in mine], where):
                    edges.append(warning)
                    tag = ".".join(p for p in (label if space.arms else "", *map(case_key, (v for k, v in condition.items()
                                               if k != space.arms)), key) if p)
                    tags[f"search_space.edge.{tag}"] = warning.message
    if not edges:
        return None
    return Finding("range_edges", tags=tags, warnings=[("search-space edge", w.message) for w in edges])


@register_analysis
def importance(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """fANOVA importance of each sampled parameter (:func:`hyperparameter_importance`), per arm's study."""
    objective = 1 if facts.space.metric.multi_objective else 0
    found = {label: imp for value, label in facts.arms()
             if (imp := hyperparameter_importance(facts.study_url, study_name(outcome.name, value), objective))}
    if not found:
        return None
    armed = bool(facts.space.arms)
    flat = {f"{label}: {k}" if armed else k: float(v) for label, imp in found.items() for k, v in imp.items()}
    return Finding("importance", metrics={f"importance.{label}.{k}" if armed else f"importance.{k}": float(v)
                                          for label, imp in found.items() for k, v in imp.items()},
                   table=("hyperparameter importance for best val robust accuracy (Optuna fANOVA, completed trials"
                          + (", each arm's own study" if armed else "") + "; importance.png and val_robust_vs_lr.png "
                          "in the parent run)", ["parameter", "importance"], [[k, f"{v:.2f}"] for k, v in flat.items()]),
                   figure="importance.png", plot=lambda path: plot_importance(flat, path, f"sweep {outcome.name}"))


@register_analysis
def comparison(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """The confirmation (:mod:`roli_sweep.comparison`): per arm, mean ± std over the seeds of the confirmed best's
    test clean and test robust accuracy; per pair of arms, the paired difference and its 95 % t interval. Logs
    ``confirm.<arm>.<metric>_mean`` / ``_std`` / ``_n``, ``diff.<a>-<b>.<metric>`` with ``_ci_low`` / ``_ci_high``
    / ``_n``, ``comparison.md`` and ``paired_seeds.png``."""
    if not outcome.confirmed:
        return None
    space = facts.space
    found = compare(outcome.confirmation, outcome.confirmed, space.arms, facts.confirmation_seeds)
    attack = evaluation_attack(space.base.attack, space.base.eval)
    threat = f"L-inf {eps_fraction(attack.eps)}, PGD-{space.base.eval.test_steps}"
    metrics, rows = {}, []
    for arm in found.arms:
        cells = []
        for metric in METRICS:
            stats = arm.mean_std(metric)
            cells.append("-" if stats is None else f"{stats[0]:.3f} ± {stats[1]:.3f}")
            if stats is not None:
                metrics |= {f"confirm.{arm.arm}.rank{arm.rank}.{metric}_mean": stats[0],
                            f"confirm.{arm.arm}.rank{arm.rank}.{metric}_std": stats[1]}
        metrics[f"confirm.{arm.arm}.rank{arm.rank}.seeds_completed"] = float(len(arm.runs))
        rows.append([arm.arm, str(arm.rank), arm.source_trial, f"{len(arm.runs)} of {len(found.seeds)}", *cells])
    for diff in found.differences:
        key = f"diff.{diff.first}-{diff.second}.{diff.metric}"
        if diff.mean is not None:
            metrics[key] = diff.mean
        if diff.interval is not None:
            metrics |= {f"{key}_ci_low": diff.interval[0], f"{key}_ci_high": diff.interval[1]}
        metrics[f"{key}_n"] = float(diff.n)
    notes = [describe(d) for d in found.differences]
    notes += sorted({c for d in found.differences if (c := d.caveat())})
    failed = sum(arm.failed for arm in found.arms)
    if failed:
        notes.append(f"{failed} confirmation run(s) did not complete; their seeds are left out of the means and pairs")
    return Finding("comparison", metrics=metrics,
                   table=(f"confirmation: each arm's best rerun over seeds {found.seeds}, test accuracy "
                          f"({threat}); comparison.md and paired_seeds.png in the parent run",
                          ["arm", "rank", "search trial", "seeds", "test clean mean ± std", "test robust mean ± std"],
                          rows),
                   notes=notes, text=("comparison.md", markdown(found, outcome.name, threat)),
                   figure="paired_seeds.png" if found.differences else None,
                   plot=lambda path: plot_paired_seeds(found, path, f"sweep {outcome.name}"))


@register_analysis
def robust_vs_lr(outcome: SweepOutcome, facts: SweepFacts) -> Finding | None:
    """Best val robust accuracy against the lr, RoLI red and RanLI blue, hollow for ASHA-stopped trials."""
    points = lr_points(outcome.rows, facts.space.base.finetune.head_init)
    if not points:
        return None
    return Finding("robust_vs_lr", figure="val_robust_vs_lr.png",
                   plot=lambda path: plot_metric_vs_lr(points, path, f"sweep {outcome.name}"))


def analyse_sweep(outcome: SweepOutcome, facts: SweepFacts) -> None:
    """Every registered analysis over ``outcome``'s trials; what they found goes to ``outcome.findings``."""
    outcome.findings = [found for analysis in ANALYSES if (found := analysis(outcome, facts)) is not None]
