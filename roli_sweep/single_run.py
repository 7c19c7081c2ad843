"""``run_sweep.py train``: one trial config, outside any sweep, with a progress bar and an MLflow run.

The run is laid out like a sweep's child run (same params, tags, per-epoch metrics and
``trial_config.yaml`` artifact), so a rerun of an exported config compares directly with the trial
it came from.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from roli_sweep.config import TrialConfig, apply_overrides
from roli_sweep.console import default_console
from roli_sweep.evaluation.final_eval import evaluate_and_check
from roli_sweep.records import Check
from roli_sweep.tracking import describe_trial_run, experiment_id, final_eval_record, log_epoch_metrics
from roli_sweep.core.trial import run_trial


def train_logged(cfg: TrialConfig, config_path: Path, tracking_uri: str, experiment: str,
                 console: Console | None = None, final_eval: bool = True) -> dict[str, float]:
    """Run ``cfg`` (probe then finetune) and log it as one MLflow run tagged ``status``.

    With ``final_eval``, the tested model then gets the final evaluation of ``cfg.eval.final``
    (clean, PGD with restarts, AutoAttack) and the gradient-masking checks, logged to the same run
    and printed (it follows the training in one process, so it keeps no resumable state; a sweep's
    final evaluations do).

    Returns:
        The trial's summary metrics (best-epoch val accuracies, test accuracies, probe accuracies),
        plus ``final_pgd_acc`` / ``final_autoattack_acc`` from the final evaluation.

    Raises:
        Whatever the trial raises, after tagging the run ``failed``.
    """
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment), run_name=config_path.stem,
                            tags={"status": "running", "source_config": str(config_path)})
    run_id = run.info.run_id
    describe_trial_run(client, run_id, cfg)
    total = cfg.probe.epochs + cfg.finetune.epochs
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}", markup=False))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("probe", total=total, last="")

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
            if stage == "probe_done":
                return
            last = f"val clean {metrics['val_clean_acc']:.3f} robust {metrics['val_robust_acc']:.3f}"
            progress.update(task, advance=1, description=stage, last=last)
            if stage == "finetune":
                log_epoch_metrics(client, run_id, metrics)

        try:
            result = run_trial(cfg, on_epoch)
        except BaseException:
            client.set_tag(run_id, "status", "failed")
            client.set_terminated(run_id, "FAILED")
            raise
    console = console or default_console()
    metrics = dict(result.metrics)
    if final_eval:
        final = evaluate_and_check(result.model, result.test_set, cfg, result.num_classes,
                                   next(result.model.parameters()).device)
        record = final.record()
        final_eval_record(run_id, client, record)
        metrics.update(record.metrics)
        print_checks(console, final.checks)
    client.set_tag(run_id, "status", "completed")
    client.set_terminated(run_id, "FINISHED")
    console.print(f"MLflow run {run_id} in experiment {experiment!r} ({tracking_uri})")
    return metrics


def print_checks(console: Console, checks: list[Check]) -> None:
    """One line per gradient-masking check; warnings in red."""
    for c in checks:
        style = "green" if c.status == "pass" else "bold red"
        console.print(Text.assemble((f"masking check {c.name}: {c.status}", style), f" ({c.detail})"))


def _stat(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def train_seeds(cfg: TrialConfig, config_path: Path, seeds: int, paired: bool, tracking_uri: str, experiment: str,
                console: Console, final_eval: bool = True) -> dict[str, dict[int, dict[str, float]]]:
    """Rerun ``cfg`` with seeds ``cfg.seed .. cfg.seed + seeds - 1`` (each an MLflow run) and print mean ± std.

    With ``paired``, every seed runs with RoLI and with RanLI at the same hyperparameters and the
    table adds the paired RoLI - RanLI difference (same seed: same split, data order and attack RNG),
    mean ± sample std over seeds, in percentage points.

    Returns:
        ``{head_init: {seed: metrics}}``.
    """
    inits = ["random", "roli"] if paired else [cfg.finetune.head_init]
    results: dict[str, dict[int, dict[str, float]]] = {init: {} for init in inits}
    for seed in range(cfg.seed, cfg.seed + seeds):
        for init in inits:
            run_cfg = apply_overrides(cfg, {"seed": seed, "finetune.head_init": init})
            console.print(f"seed {seed}, head_init {init}", style="bold")
            results[init][seed] = train_logged(run_cfg, config_path, tracking_uri, experiment, console, final_eval)
    keys = [k for k in ("val_robust_acc", "test_clean_acc", "test_robust_acc", "final_pgd_acc", "final_autoattack_acc")
            if all(k in m for runs in results.values() for m in runs.values())]
    table = Table(title=f"{config_path.name}: {seeds} seeds, % mean ± std")
    table.add_column("")
    for key in keys:
        table.add_column(key, justify="right")
    for init, runs in results.items():
        table.add_row("RoLI" if init == "roli" else "RanLI", *[_stat([m[k] for m in runs.values()]) for k in keys])
    if paired:
        table.add_row("RoLI - RanLI (paired)", *[_stat([results["roli"][s][k] - results["random"][s][k]
                                                        for s in results["roli"]]) for k in keys])
    console.print(table)
    return results
