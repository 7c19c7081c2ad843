"""Export the best trials of a sweep from MLflow as complete trial-config YAML files.

Each file is the resolved trial config the child run logged (sampled values filled in, seed
included), behind a comment header saying where it came from; ``run_sweep.py train --config FILE``
reruns it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from roli_sweep.tracking import ROLE_TAG, TRIAL_CONFIG_ARTIFACT


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ExportError(LookupError):
    """No such sweep, or no completed trial in it."""


def find_parent_run(client: MlflowClient, sweep: str):
    """The parent run of sweep ``sweep`` in any experiment.

    Raises:
        ExportError: no parent run carries that sweep name.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.sweep = '{sweep}' and tags.{ROLE_TAG} = 'parent'")
    if not runs:
        raise ExportError(f"no sweep named {sweep!r} in this MLflow store")
    return runs[0]


def export_best(tracking_uri: str, sweep: str, top_k: int, out_dir: Path) -> list[Path]:
    """Write the ``top_k`` completed trials of ``sweep``, best validation robust accuracy first.

    Returns:
        The written paths, ``<out_dir>/<sweep>-rank<i>-<trial_id>.yaml``.

    Raises:
        ExportError: unknown sweep, or no completed trial.
    """
    client = MlflowClient(tracking_uri)
    parent = find_parent_run(client, sweep)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.status = 'completed'",
        order_by=["metrics.best_val_robust_acc DESC"], max_results=top_k)
    if not children:
        raise ExportError(f"sweep {sweep!r} has no completed trial to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, run in enumerate(children, start=1):
        with tempfile.TemporaryDirectory() as tmp:
            logged = client.download_artifacts(run.info.run_id, TRIAL_CONFIG_ARTIFACT, tmp)
            config_text = Path(logged).read_text()  # the resolved config, validated when the trial ran
        trial_id = run.data.tags.get("trial_id", run.info.run_id)
        m = run.data.metrics
        header = (f"# sweep {sweep}, rank {rank} of {len(children)} by best val_robust_acc\n"
                  f"# trial {trial_id}, MLflow run {run.info.run_id}\n"
                  f"# val clean {m.get('best_val_clean_acc', float('nan')):.4f}, "
                  f"val robust {m.get('best_val_robust_acc', float('nan')):.4f}, "
                  f"test clean {m.get('test_clean_acc', float('nan')):.4f}, "
                  f"test robust {m.get('test_robust_acc', float('nan')):.4f}\n")
        path = out_dir / f"{sweep}-rank{rank}-{trial_id}.yaml"
        path.write_text(header + config_text)
        written.append(path)
    return written
