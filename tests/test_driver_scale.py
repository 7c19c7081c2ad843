"""``benchmarks/driver_scale.py`` at a small scale, as a user runs it: both stacks, the trivial trial through the whole
sweep (Optuna studies in the RDB, ASHA, MLflow parent and child runs, saved epochs, console, analyses, end tables)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.extended
def test_driver_scale_runs_both_stacks_through_the_whole_sweep(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "driver_scale.py"), "--trials", "8", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "bare, 8 trials:" in out and "roli_sweep, 8 trials:" in out
    for component in ("MLflow child runs", "Optuna studies (RDB) and TPE", "ASHA", "end-of-sweep analyses",
                      "MLflowLoggerCallback", "Ray Tune and the rest"):
        assert component in out, component
    summary = out.split("ratio", 1)[1].splitlines()
    assert any(line.split()[:1] == ["8"] for line in summary), out

    client = MlflowClient(f"sqlite:///{tmp_path / 'roli_sweep_8' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.sweep_role = 'parent'")
    children = client.search_runs([experiment], filter_string="tags.sweep_role = 'trial'")
    assert len(children) == 8 and parent.data.tags["status"] == "finished"
    statuses = sorted(c.data.tags["status"] for c in children)
    assert set(statuses) <= {"completed", "pruned"} and "completed" in statuses
    for child in children:  # every finetune epoch a trial ran is logged once
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert steps and sorted(steps) == list(range(1, len(steps) + 1))
    # each arm's study told what happened to its 4 trials; each trial keeps one saved epoch
    for arm in ("roli", "random"):
        study = optuna.load_study(study_name=f"roli.{arm}",
                                  storage=f"sqlite:///{tmp_path / 'roli_sweep_8' / 'roli' / 'optuna.db'}")
        assert len(study.trials) == 4 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    saved = list((tmp_path / "roli_sweep_8" / "roli" / "trial_state" / "roli").iterdir())
    assert len(saved) == 8 and all([p.name for p in trial.iterdir()] == ["current"] for trial in saved)


@pytest.mark.extended
def test_a_sweep_past_the_limit_is_stopped_and_reported_to_where_it_got(tmp_path):
    """``--limit-s``: the sweep's process and its Ray runtime are ended, the benchmark goes on and prints the trials
    that ended before the limit, with their per-trial time."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "driver_scale.py"), "--trials", "5000",
                          "--stacks", "bare", "--limit-s", "45", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("bare, 5000 trials: STOPPED"))
    ended = int(line.split(" with ")[1].split()[0])
    assert 0 < ended < 5000, line
    assert "RESULT" not in (tmp_path / "bare_5000.log").read_text()
