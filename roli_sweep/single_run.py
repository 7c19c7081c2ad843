"""``run_sweep.py train``: one trial config, outside any sweep, with a progress bar and an MLflow run.

The run is laid out like a sweep's child run (same params, tags, per-epoch metrics and
``trial_config.yaml`` artifact), so a rerun of an exported config compares directly with the trial
it came from.
"""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from roli_sweep.config import TrialConfig
from roli_sweep.tracking import describe_trial_run, experiment_id, log_epoch_metrics
from roli_sweep.trial import run_trial


def train_logged(cfg: TrialConfig, config_path: Path, tracking_uri: str, experiment: str,
                 console: Console | None = None) -> dict[str, float]:
    """Run ``cfg`` (probe then finetune) and log it as one MLflow run tagged ``status``.

    Returns:
        The trial's summary metrics (best-epoch val accuracies, test accuracies, probe accuracies).

    Raises:
        Whatever the trial raises, after tagging the run ``failed``.
    """
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment), run_name=config_path.stem,
                            tags={"status": "running", "source_config": str(config_path)})
    run_id = run.info.run_id
    describe_trial_run(client, run_id, cfg)
    total = cfg.probe.epochs + cfg.finetune.epochs
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("probe", total=total, last="")

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
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
    client.set_tag(run_id, "status", "completed")
    client.set_terminated(run_id, "FINISHED")
    console = console or Console()
    console.print(f"MLflow run {run_id} in experiment {experiment!r} ({tracking_uri})")
    return result.metrics
