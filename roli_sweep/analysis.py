"""What a finished sweep says about its search space: which hyperparameters mattered (Optuna's fANOVA on the
sweep's stored study) and how validation robust accuracy depends on the learning rate, RoLI against RanLI.

Both are logged to the sweep's parent run as PNGs (``importance.png``, ``val_robust_vs_lr.png``) and the
importances as metrics ``importance.<parameter>``. References: Optuna ``optuna.importance`` docs (fANOVA,
Hutter et al., ICML 2014); MLflow ``log_artifact``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from roli_sweep.plots import plot_importance, plot_metric_vs_lr

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


def lr_points(rows: Sequence[Any], base_head_init: str) -> list[tuple[float, float, str, bool]]:
    """``(lr, best val robust, head_init, completed)`` of every trial that reported one and sampled ``finetune.lr``."""
    return [(float(r.sampled["finetune.lr"]), float(r.val_robust_acc), str(r.sampled.get("finetune.head_init",
             base_head_init)), r.status == "completed")
            for r in rows if "finetune.lr" in r.sampled and r.val_robust_acc is not None]


def log_sweep_analysis(client: MlflowClient, parent_run_id: str, storage_url: str, study_name: str,
                       rows: Sequence[Any], base_head_init: str, multi_objective: bool) -> dict[str, float] | None:
    """Log the importances and the lr plot to the parent run; returns the importances (None when too few trials)."""
    importances = hyperparameter_importance(storage_url, study_name, objective=1 if multi_objective else 0)
    points = lr_points(rows, base_head_init)
    with tempfile.TemporaryDirectory() as tmp:
        if importances:
            plot_importance(importances, Path(tmp) / "importance.png", f"sweep {study_name}")
            client.log_artifact(parent_run_id, str(Path(tmp) / "importance.png"))
            now = int(time.time() * 1000)
            client.log_batch(parent_run_id, metrics=[Metric(f"importance.{k}", float(v), now, 0)
                                                     for k, v in importances.items()])
        if points:
            plot_metric_vs_lr(points, Path(tmp) / "val_robust_vs_lr.png", f"sweep {study_name}")
            client.log_artifact(parent_run_id, str(Path(tmp) / "val_robust_vs_lr.png"))
    return importances
