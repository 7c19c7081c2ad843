"""Off the happy path, with real Ray and real MLflow: Ctrl+C and resume, divergence, failing trials, corrupt
weights, missing data, Ray's authentication, and no Ray process left behind."""
from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from roli_sweep.tune.auth_token import auth_token_path
from tests.conftest import write_yaml

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 6
"""Finetune epochs of the sweeps these tests interrupt."""


def _ray_processes(*sessions: int) -> set[int]:
    """Pids of the Ray processes (GCS, raylet, agents, workers) in the given process sessions: the sweeps the
    test started with ``start_new_session``, not the test session's own runtime or anything else."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(proc.pid) not in sessions:
                continue
        except OSError:  # gone meanwhile
            continue
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if any(tag in text for tag in ("gcs_server", "raylet", "ray::", "dashboard", "runtime_env", "log_monitor",
                                       "ray/_private/monitor", "default_worker")):
            found.add(proc.pid)
    return found


def _wait_gone(*sessions: int, seconds: float = 20) -> set[int]:
    """The Ray processes of ``sessions`` still there after up to ``seconds`` (workers exit once their raylet is gone)."""
    deadline = time.time() + seconds
    while (left := _ray_processes(*sessions)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _corrupt(kind: str, folder: Path, tiny_weights: Path) -> Path:
    if kind == "truncated_safetensors":
        path = folder / "cut.safetensors"
        path.write_bytes(tiny_weights.read_bytes()[:-200])
    elif kind == "not_safetensors":
        path = folder / "text.safetensors"
        path.write_text("not a checkpoint")
    elif kind == "random_pth":
        path = folder / "noise.pth"
        path.write_bytes(os.urandom(4096))
    else:  # a training script's checkpoint with a non-tensor object in it
        import argparse

        path = folder / "with_args.pth"
        torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


@pytest.mark.parametrize("kind", ["truncated_safetensors", "not_safetensors", "random_pth", "pickle_with_objects"])
def test_corrupt_weights_exit_2_naming_the_file(tmp_path, monkeypatch, capsys, space_dict, tiny_weights, kind):
    monkeypatch.chdir(tmp_path)
    weights = _corrupt(kind, tmp_path, tiny_weights)
    tree = copy.deepcopy(space_dict)
    tree["base"]["backbone"]["weights"] = str(weights)
    status = main(["--space", str(write_yaml(tmp_path / "space.yaml", tree)),
                   "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = " ".join(capsys.readouterr().out.split())
    assert status == 2
    assert out.count("backbone.weights") == 1 and str(weights) in out
    expected = {"truncated_safetensors": "truncated", "not_safetensors": "not a safetensors file",
                "random_pth": "not a PyTorch checkpoint", "pickle_with_objects": "argparse.Namespace"}[kind]
    assert expected in out and "weights_only=False" not in out and "Traceback" not in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_missing_dataset_exits_2_before_anything_starts(tmp_path, monkeypatch, capsys, space_dict):
    monkeypatch.chdir(tmp_path)
    tree = copy.deepcopy(space_dict)
    tree["base"]["data"] = {"name": "cifar10", "root": str(tmp_path / "empty")}
    status = main(["--space", str(write_yaml(tmp_path / "space.yaml", tree)),
                   "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = " ".join(capsys.readouterr().out.split())
    assert status == 2 and "data.root" in out and "cifar-10-batches-py" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_a_sweep_whose_trials_all_diverge_fails(tmp_path, monkeypatch, capsys, ray_runtime, space_dict):
    monkeypatch.chdir(tmp_path)
    tree = copy.deepcopy(space_dict)
    tree["num_samples"] = 2
    tree["parameters"] = {"finetune.lr": {"values": [1.0e30]}}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--space", str(write_yaml(tmp_path / "div.yaml", tree)), "--name", "div", "--tracking-uri", uri]) == 1
    out = capsys.readouterr().out
    assert "every trial failed" in out and "DivergenceError: non-finite" in out
    assert "export" not in out.split("every trial failed")[1]
    client = MlflowClient(uri)
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.sweep = 'div' and tags.sweep_role = 'trial'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["status"] == "failed" and "non-finite" in child.data.tags["failure"]
        assert "at finetune epoch 1, step" in child.data.tags["failure"] and "test_robust_acc" not in child.data.metrics
    import optuna

    study = optuna.load_study(study_name="div", storage=f"sqlite:///{tmp_path}/ray_results/div/optuna.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert main(["export", "--name", "div", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2


def test_ray_authentication_is_on(ray_runtime):
    """A client without the token is refused by the sweep's runtime (Ray 2.60 token authentication)."""
    gcs = ray_runtime._private.worker.global_worker.node.gcs_address
    probe = ("import ray._raylet as r\n"
             "try:\n    r.GcsClient(address=%r).internal_kv_keys(b'', namespace=None, timeout=5)\n"
             "    print('ACCEPTED')\n"
             "except Exception as e:\n    print('REFUSED', type(e).__name__)" % gcs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}

    def ask(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_AUTH_MODE": mode}, capture_output=True,
                              text=True, timeout=60).stdout

    assert "REFUSED AuthenticationError" in ask("disabled")
    assert "ACCEPTED" in ask("token"), "with the token (~/.ray/auth_token) the same client gets in"


def _space_for_interrupt(space_dict: dict, tmp_path: Path) -> Path:
    tree = copy.deepcopy(space_dict)
    tree.update(num_samples=3, max_concurrent=2)
    tree["scheduler"] = {"grace_period": EPOCHS, "reduction_factor": 2, "max_t": EPOCHS}  # no pruning
    tree["base"]["data"].update(train_size=1000)  # about a second per epoch: Ctrl+C lands mid-trial
    tree["base"]["attack"]["steps"] = 5
    tree["base"]["finetune"]["epochs"] = EPOCHS
    tree["base"]["eval"]["final"].update(n_examples=8, autoattack=False)
    tree["parameters"] = {"finetune.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}
    return write_yaml(tmp_path / "space.yaml", tree)


def _finetune_epochs_logged(db: Path, role: str = "") -> int:
    """The most finetune epochs any run (with ``role``: any run of that ``sweep_role``) has logged so far, read from
    the sweep's SQLite store read-only (an MlflowClient here could race the sweep's own creation of the tables)."""
    import sqlite3

    if not db.exists():
        return 0
    join = ("JOIN tags t ON m.run_uuid = t.run_uuid AND t.key = 'sweep_role' AND t.value = ?" if role else "")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(f"SELECT COUNT(*) FROM metrics m {join} WHERE m.key = 'train_loss' GROUP BY m.run_uuid",
                               (role,) if role else ()).fetchall()
        return max((n for (n,) in rows), default=0)
    except sqlite3.Error:  # the sweep is still creating the store
        return 0


def _interrupted_sweep(space: Path, name: str, db: Path, storage: Path, cwd: Path, role: str = "",
                       seconds: float = 240) -> tuple[str, str]:
    """Run ``run_sweep.py`` in its own process group, press Ctrl+C once a run (of ``role``) has logged a finetune
    epoch, and check it exits 130. Returns its output and the ``--resume`` command it printed."""
    command = [sys.executable, str(ROOT / "run_sweep.py"), "--space", str(space), "--name", name,
               "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(storage), "--num-cpus", "2"]
    sweep = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = time.time() + seconds
    while _finetune_epochs_logged(db, role) < 1 and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    assert sweep.poll() is None, sweep.stdout.read()
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl+C in a terminal signals the whole foreground group
    out, _ = sweep.communicate(timeout=240)
    assert sweep.returncode == 130, out
    assert not _wait_gone(sweep.pid), "no Ray process of the interrupted sweep remains"
    return out, next(line.strip() for line in out.splitlines() if "--resume" in line and "run_sweep.py" in line)


def test_ctrl_c_then_resume_loses_nothing_and_duplicates_nothing(tmp_path, space_dict):
    space = _space_for_interrupt(space_dict, tmp_path)
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray results"  # a space: the printed command quotes it
    out, resume = _interrupted_sweep(space, "cc", db, storage, tmp_path)
    client = MlflowClient(f"sqlite:///{db}")
    exp = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exp, filter_string="tags.sweep_role = 'parent'")
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "interrupted"
    children = client.search_runs(exp, filter_string="tags.sweep_role = 'trial'")
    assert children and not [c for c in children if c.info.status == "RUNNING"]
    interrupted = [c.info.run_id for c in children if c.data.tags["status"] == "interrupted"]
    assert interrupted and all(c.info.status == "KILLED" for c in children if c.info.run_id in interrupted)
    table = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    for child in children:
        if child.info.run_id in interrupted:
            assert "interrupted" in table[child.data.tags["trial_id"]], "shown as interrupted, not pruned"
    epochs_before = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "train_loss")) for c in children}
    token = auth_token_path()  # the token file this runtime used: private after the sweep
    assert token is None or stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)

    # the printed command, as the user would run it
    resumed = subprocess.run(shlex.split(resume), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (parent_after,) = client.search_runs(exp, filter_string="tags.sweep_role = 'parent'")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert parent_after.data.tags["status"] == "finished"
    children = client.search_runs(exp, filter_string="tags.sweep_role = 'trial'")
    assert len(children) == 3 and {c.data.tags["status"] for c in children} == {"completed"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), "every epoch logged exactly once"
    # no trial restarted from epoch 1: a restored trial reports its last saved epoch again (the driver may not have
    # processed it) and continues after it, so no epoch before the last one delivered runs again
    for result_file in storage.glob("cc/*/result.json"):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        results = [r for r in results if "epoch" in r]  # not the probe epochs' progress reports
        resumed_at = [i for i, r in enumerate(results) if r["iterations_since_restore"] == 1 and i > 0]
        if not resumed_at:
            continue
        before, after = results[:resumed_at[0]], results[resumed_at[0]:]
        last_before = max(r["epoch"] for r in before)
        assert after[0]["epoch"] >= last_before, (result_file, [r["epoch"] for r in results])
        assert [r["epoch"] for r in after] == list(range(after[0]["epoch"], EPOCHS + 1))
    assert any(0 < n < EPOCHS for run_id, n in epochs_before.items() if run_id in interrupted)


@pytest.mark.extended
def test_ctrl_c_during_the_confirmation_then_resume_finishes_it_once(tmp_path, space_dict):
    """An armed sweep stopped while it confirms: --resume keeps the search, continues the confirmation runs and
    logs every epoch once; the comparison is then made over every seed."""
    tree = yaml.safe_load(_space_for_interrupt(space_dict, tmp_path).read_text())
    tree.update(num_samples=2, arms="finetune.head_init", confirm={"seeds": 2})
    tree["parameters"]["finetune.head_init"] = {"values": ["roli", "random"]}
    space = write_yaml(tmp_path / "armed.yaml", tree)
    db = tmp_path / "mlflow.db"
    out, resume = _interrupted_sweep(space, "cf", db, tmp_path / "ray_results", tmp_path, role="confirmation",
                                     seconds=400)
    client = MlflowClient(f"sqlite:///{db}")
    exp = [e.experiment_id for e in client.search_experiments()]
    confirming = client.search_runs(exp, filter_string="tags.sweep_role = 'confirmation'")
    assert any(c.data.tags["status"] == "interrupted" for c in confirming), [c.data.tags["status"] for c in confirming]

    resumed = subprocess.run(shlex.split(resume), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (parent,) = client.search_runs(exp, filter_string="tags.sweep_role = 'parent'")
    assert parent.info.status == "FINISHED"
    search = client.search_runs(exp, filter_string="tags.sweep_role = 'trial'")
    confirming = client.search_runs(exp, filter_string="tags.sweep_role = 'confirmation'")
    assert len(search) == 2 and sorted(c.data.tags["arm"] for c in search) == ["RanLI", "RoLI"]
    assert sorted((c.data.tags["arm"], c.data.params["seed"]) for c in confirming) == [
        ("RanLI", "1"), ("RanLI", "2"), ("RoLI", "1"), ("RoLI", "2")]
    for run in [*search, *confirming]:
        assert run.data.tags["status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), "every epoch logged exactly once"
    assert parent.data.metrics["diff.RoLI-RanLI.test_robust_acc_n"] == 2


@pytest.mark.extended
def test_a_killed_drivers_runtime_is_ended_at_the_next_start(tmp_path, space_dict, monkeypatch):
    """SIGKILL leaves Ray's agents behind; the next start ends them by their recorded pids, start times and
    Ray session (the record in this user's state folder, never in the storage folder), then the resumed sweep
    finishes every trial."""
    from roli_sweep.tune.runtime import record_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the sweeps' records, and record_path's
    space = _space_for_interrupt(space_dict, tmp_path)
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray_results"
    command = [sys.executable, str(ROOT / "run_sweep.py"), "--space", str(space), "--name", "kk",
               "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(storage), "--num-cpus", "2"]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while _finetune_epochs_logged(db) < 1 and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    record = json.loads(record_path(storage).read_text())
    assert not (storage / ".ray_runtime.json").exists()
    os.kill(sweep.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9` would
    sweep.wait()
    time.sleep(3)
    recorded = {p["pid"] for p in record["processes"]}
    assert _ray_processes(sweep.pid) & recorded, "Ray's agents outlive a killed driver"
    resumed = subprocess.Popen(command + ["--resume"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert not _wait_gone(sweep.pid, resumed.pid), "neither the stale runtime nor the resumed one remains"
    assert not record_path(storage).exists()
    client = MlflowClient(f"sqlite:///{db}")
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.sweep_role = 'trial'")
    assert len(children) == 3 and {c.data.tags["status"] for c in children} == {"completed"}


def test_a_second_ctrl_c_exits_at_once(tmp_path, space_dict):
    from roli_sweep.tune.runtime import end_stale_runtime

    space = _space_for_interrupt(space_dict, tmp_path)
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray_results"
    sweep = subprocess.Popen([sys.executable, str(ROOT / "run_sweep.py"), "--space", str(space), "--name", "twice",
                              "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(storage), "--num-cpus", "2"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while _finetune_epochs_logged(db) < 1 and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGINT)
    time.sleep(0.2)
    pressed = time.time()
    os.killpg(sweep.pid, signal.SIGINT)
    code = sweep.wait(timeout=30)
    waited = time.time() - pressed
    assert code == 130 and waited < 5, f"exit {code} {waited:.1f} s after the second Ctrl+C"
    end_stale_runtime(storage)  # what the next start does
    assert not _wait_gone(sweep.pid)


@pytest.mark.extended
def test_no_ray_process_outlives_a_sweep_whose_trials_all_fail(tmp_path, space_dict):
    tree = copy.deepcopy(space_dict)
    tree.update(num_samples=2)
    tree["parameters"] = {"finetune.lr": {"values": [1.0e30]}}
    space = write_yaml(tmp_path / "div.yaml", tree)
    done = subprocess.Popen([sys.executable, str(ROOT / "run_sweep.py"), "--space", str(space), "--name", "div",
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path",
                             str(tmp_path / "ray_results"), "--num-cpus", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 1 and "DivergenceError" in out
    assert not _wait_gone(done.pid)
