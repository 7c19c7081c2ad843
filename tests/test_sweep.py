"""End to end on a real Ray runtime (num_cpus=2) and a real sqlite MLflow store: sweep, export, train."""
from __future__ import annotations

import copy
import shlex

import pytest
import yaml
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from tests.conftest import write_yaml


def _children(client: MlflowClient, sweep: str):
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string=f"tags.sweep = '{sweep}' and tags.sweep_role = 'parent'")
    assert len(parent) == 1
    children = client.search_runs([parent[0].info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    return parent[0], children


def _serves(command: list[str], cwd) -> None:
    """Run an ``mlflow ui`` / ``mlflow server`` command with ``--port`` added until it answers ``/health``."""
    import shutil
    import subprocess
    import time
    import urllib.request

    from tests.test_cluster import free_port

    port = free_port()
    server = subprocess.Popen([shutil.which(command[0]) or command[0], *command[1:], "--port", str(port)], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    assert reply.status == 200
                    return
            except OSError:
                assert server.poll() is None, f"{command} exited with {server.returncode}"
                time.sleep(0.5)
        raise AssertionError(f"{command} did not answer within 90 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sweep_export_train_round_trip(tmp_path, monkeypatch, ray_runtime, space_dict, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_yaml(tmp_path / "tiny.yaml", space_dict)
    assert main(["--space", str(space), "--name", "s1", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    # the export command the sweep prints, run as printed
    export = next(line for line in printed.splitlines() if line.startswith("export the best: python "))
    args = shlex.split(export.removeprefix("export the best: "))[2:]
    assert args[:3] == ["export", "--name", "s1"] and main(args) == 0
    assert len(list((tmp_path / "exported").glob("s1-rank*.yaml"))) >= 1

    # no Ray box or TensorBoard hint; the threat model as the field writes it; Ray's logs in the sweep's log file
    assert "Configuration for experiment" not in printed and "tensorboard" not in printed.lower()
    assert "L-inf 8/255, PGD-20 ×2 restarts, AutoAttack standard, 16 test images" in printed
    assert "finetune epoch 2/2" in printed and "stage-1 probe cached" in printed
    assert "result files and experiment state" in (tmp_path / "ray_results" / "s1" / "sweep.log").read_text()
    # the mlflow ui command the sweep prints serves the store (run as printed, on a free port)
    ui = next(line.strip() for line in printed.splitlines() if line.strip().startswith("mlflow ui "))
    _serves(shlex.split(ui), tmp_path)

    client = MlflowClient(uri)
    parent, children = _children(client, "s1")
    assert len(children) == 4
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning" in printed
    # one probe setting: computed once, read from the cache by the other trials
    assert sorted(c.data.tags["probe"] for c in children) == ["cached", "cached", "cached", "computed"]
    assert len({c.data.tags["probe_key"] for c in children}) == 1
    compute = parent.data.metrics
    assert compute["compute_trials_s"] > 0 and compute["compute_final_eval_s"] > 0
    assert compute["compute_probe_saved_s"] > 0 and 0.0 <= compute["idle_fraction"] <= 1.0
    assert "val_robust_vs_lr.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "tiny.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    statuses = [c.data.tags["status"] for c in children]
    assert set(statuses) <= {"completed", "pruned"} and "completed" in statuses
    # Optuna was told the truth: ASHA-stopped trials PRUNED, whole ones COMPLETE, every epoch reported once
    import optuna

    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path}/ray_results/s1/optuna.db")
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == statuses.count("pruned") and states.count("COMPLETE") == statuses.count("completed")
    assert all(sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1)) and t.intermediate_values
               for t in study.trials)
    for child in children:
        assert child.data.params["finetune.method"] == "lora"
        assert child.data.params["seed"] == "0"
        assert child.data.tags["git_commit"] and child.data.tags["version.torch"]
        history = client.get_metric_history(child.info.run_id, "val_robust_acc")
        epochs = sorted(m.step for m in history)
        assert epochs == list(range(1, len(epochs) + 1)) and epochs
        if child.data.tags["status"] == "completed":
            assert epochs == [1, 2]
            assert 0.0 <= child.data.metrics["test_robust_acc"] <= 1.0
        else:
            assert "test_robust_acc" not in child.data.metrics
    assert parent.data.metrics["trials_completed"] == statuses.count("completed")
    best = max((c for c in children if c.data.tags["status"] == "completed"),
               key=lambda c: c.data.metrics["best_val_robust_acc"])
    assert parent.data.metrics["best_val_robust_acc"] == pytest.approx(best.data.metrics["best_val_robust_acc"])

    # a best trial (final_top_k: 1) got the final evaluation from its checkpoint, and the masking checks
    evaluated = [c for c in children if "final_eval" in c.data.tags]
    assert len(evaluated) == 1
    final = evaluated[0]
    assert final.data.metrics["best_val_robust_acc"] == best.data.metrics["best_val_robust_acc"]
    assert final.data.tags["final_eval"] == "done" and final.data.tags["masking"] in ("pass", "warning")
    assert {f"masking.{c}" for c in ("order", "eps_sweep", "more_steps", "black_box", "gradients", "logits",
                                     "deterministic")} <= set(final.data.tags)
    m = final.data.metrics
    assert m["final_autoattack_acc"] <= m["final_pgd_acc"] + 1 / 16 and m["final_pgd_acc"] <= m["final_clean_acc"]
    assert final.data.params["final_eval.n_examples"] == "16"
    # AutoAttack as published: 100 iterations, 9 target classes (digits has 10), Square 5000 queries
    assert {k: final.data.params[f"final_eval.autoattack.{k}"] for k in
            ("version", "apgd_steps", "fab_steps", "target_classes", "square_queries")} == {
        "version": "standard", "apgd_steps": "100", "fab_steps": "100", "target_classes": "9", "square_queries": "5000"}
    assert parent.data.metrics["best_final_autoattack_acc"] == m["final_autoattack_acc"]
    assert "final_evaluation.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert (tmp_path / "ray_results" / "s1" / "final_eval" / f"{final.data.tags['trial_id']}.json").is_file()

    # resuming a finished sweep restores it (Tuner.restore), reruns nothing and duplicates no run
    assert main(["--space", str(space), "--name", "s1", "--tracking-uri", uri, "--resume"]) == 0
    parent_again, children_again = _children(client, "s1")
    assert parent_again.info.run_id == parent.info.run_id and len(children_again) == 4

    out = tmp_path / "top2"
    assert main(["export", "--name", "s1", "--top-k", "2", "--out", str(out), "--tracking-uri", uri]) == 0
    files = sorted(out.glob("*.yaml"))
    assert 1 <= len(files) <= 2
    top = yaml.safe_load(files[0].read_text())
    sampled_lr = float(best.data.tags["sampled.finetune.lr"])
    assert top["finetune"]["lr"] == pytest.approx(sampled_lr) and top["seed"] == 0

    assert main(["train", "--config", str(files[0]), "--tracking-uri", uri, "--experiment", "rerun"]) == 0
    rerun = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])[0]
    assert rerun.data.tags["status"] == "completed" and rerun.data.tags["masking"] in ("pass", "warning")
    assert "final_autoattack_acc" in rerun.data.metrics
    assert rerun.data.metrics["best_val_robust_acc"] == pytest.approx(best.data.metrics["best_val_robust_acc"], abs=0.02)


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, ray_runtime, space_dict, capsys):
    """A diverging lr fails its trials with their own reason; the others complete and are reported."""
    monkeypatch.chdir(tmp_path)
    tree = copy.deepcopy(space_dict)
    tree["num_samples"] = 4
    tree["scheduler"]["grace_period"] = 2  # no pruning: every trial that does not diverge completes
    tree["parameters"] = {"finetune.lr": {"values": [1.0e30, 0.001]}}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--space", str(write_yaml(tmp_path / "mixed.yaml", tree)), "--name", "s2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    parent, children = _children(MlflowClient(uri), "s2")
    assert len(children) == 4
    failed = [c for c in children if c.data.tags["status"] == "failed"]
    assert failed and len(failed) < 4, "the seeded sampler draws both values"
    for child in children:
        diverging = float(child.data.tags["sampled.finetune.lr"]) > 1
        assert (child in failed) == diverging and child.info.status == ("FAILED" if diverging else "FINISHED")
    for child in failed:
        assert child.data.tags["failure"].startswith("DivergenceError: non-finite")
        assert "error.txt" in [a.path for a in MlflowClient(uri).list_artifacts(child.info.run_id)]
    assert parent.data.metrics["trials_failed"] == len(failed) and parent.info.status == "FINISHED"
    assert "DivergenceError: non-finite" in out and "ImplicitFunc" not in out and "\x1b[" not in out
    assert "export the best" in out


@pytest.mark.extended
def test_multi_objective_sweep_reports_a_pareto_front(tmp_path, monkeypatch, ray_runtime, space_dict, capsys):
    monkeypatch.chdir(tmp_path)
    tree = copy.deepcopy(space_dict)
    tree["metric"]["multi_objective"] = True
    tree["num_samples"] = 3
    tree["scheduler"]["grace_period"] = 2  # no pruning: every trial completes
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--space", str(write_yaml(tmp_path / "mo.yaml", tree)), "--name", "s3", "--tracking-uri", uri]) == 0
    assert "Pareto front" in capsys.readouterr().out
    client = MlflowClient(uri)
    parent, children = _children(client, "s3")
    assert "pareto_front.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert len(children) == 3 and all(c.data.tags["status"] == "completed" for c in children)


def test_pareto_front_keeps_only_undominated_trials():
    from roli_sweep.records import SweepOutcome, TrialRow

    def row(tid, clean, robust):
        return TrialRow(tid, {}, "completed", 2, clean, robust, None, None)

    rows = [row("a", 0.9, 0.1), row("b", 0.5, 0.5), row("c", 0.4, 0.4), row("d", 0.2, 0.6), row("e", 0.9, 0.05)]
    outcome = SweepOutcome("s", rows, "p", "e", "u", None)
    assert [r.trial_id for r in outcome.pareto_front()] == ["d", "b", "a"]


def test_train_with_seeds_reports_mean_std_and_paired_difference(tmp_path, trial_dict, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = write_yaml(tmp_path / "trial.yaml", trial_dict)
    assert main(["train", "--config", str(config), "--seeds", "2", "--paired", "--skip-final-eval",
                 "--tracking-uri", uri, "--experiment", "seeds"]) == 0
    out = capsys.readouterr().out
    assert "RoLI - RanLI (paired)" in out and "±" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    assert sorted((r.data.params["seed"], r.data.params["finetune.head_init"]) for r in runs) == [
        ("0", "random"), ("0", "roli"), ("1", "random"), ("1", "roli")]
    assert all("final_autoattack_acc" not in r.data.metrics for r in runs)
    assert main(["train", "--config", str(config), "--seeds", "0"]) == 2


NARROW_LR = {
    "name": "narrow", "num_samples": 6, "max_concurrent": 2, "final_top_k": 0, "confirm": {"seeds": 0},
    # TPE's first 10 trials are random; with seed 319 they draw lr 9.96e-3, 8.23e-3, 1.39e-3, 1.03e-3, 2.99e-3
    # and 9.90e-3: the three largest in the range's outer tenth, the others at least 2.7x smaller
    "seed": 319,
    "scheduler": {"grace_period": 2, "reduction_factor": 2, "max_t": 2},  # no pruning
    "base": {
        "seed": 0,
        "data": {"name": "digits", "image_size": 28, "train_size": 192, "val_size": 96, "test_size": 32},
        "backbone": {"name": "vit_tiny_patch16_224", "weights": "shipped:fmnist59_vit_robust", "mean": [0.5],
                     "std": [0.5], "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 96,
                                              "depth": 4, "num_heads": 3}},
        "attack": {"eps": "8/255", "steps": 2, "step_size": "4/255"},
        "eval": {"val_steps": 3, "test_steps": 3, "batch_size": 128},
        "probe": {"epochs": 1, "lr": 0.05, "optimizer": "sgd", "batch_size": 64},
        "finetune": {"method": "lora", "method_params": {"r": 4, "alpha": 4}, "head_init": "random", "epochs": 2,
                     "lr": 1e-3, "optimizer": "adamw", "batch_size": 64, "warmup_epochs": 0.5}},
    # measured at this setting (RanLI): val robust accuracy 0.042 at lr 1e-3, 0.052 at 3e-3, 0.125 at 8.2e-3, then
    # 0.104 at 1e-2, 3e-2 and 1e-1: the best trials sit at the upper bound, and nothing above it is worse
    "parameters": {"finetune.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2}},
}


def test_a_too_narrow_lr_range_warns_and_a_widened_space_starts_from_its_trials(tmp_path, monkeypatch, ray_runtime,
                                                                                 capsys):
    """Issue 12: the range-edge warning on the console and the parent run; ``--resume`` with a widened space
    is refused with the ``--seed-from`` command, which (run as printed) starts from the finished trials."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    narrow = write_yaml(tmp_path / "narrow.yaml", NARROW_LR)
    assert main(["--space", str(narrow), "--name", "n1", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    warning = "finetune.lr: range [0.001, 0.01] (log): the best trials ran at"
    assert warning in printed and "move max to 0.1" in printed
    client = MlflowClient(uri)
    parent, children = _children(client, "n1")
    assert parent.data.tags["search_space.edge.finetune.lr"].startswith(warning)
    assert "move max to 0.1" in parent.data.tags["search_space.edge.finetune.lr"]
    best = max(children, key=lambda c: c.data.metrics["best_val_robust_acc"])
    assert float(best.data.tags["sampled.finetune.lr"]) > 10 ** -2.1  # the warning is about where the best ran

    tree = copy.deepcopy(NARROW_LR)
    tree["parameters"]["finetune.lr"]["max"] = 0.1
    tree["num_samples"] = 2
    wider = write_yaml(tmp_path / "wider.yaml", tree)
    assert main(["--space", str(wider), "--name", "n1", "--tracking-uri", uri, "--resume"]) == 2
    refused = capsys.readouterr().out
    assert "widens finetune.lr of sweep n1" in refused
    command = next(line.strip() for line in refused.splitlines() if "--seed-from n1" in line)
    assert main(shlex.split(command)[2:]) == 0
    seeded = client.search_runs([parent.info.experiment_id], filter_string="params.seeded_from = 'n1'")
    assert len(seeded) == 1 and seeded[0].data.params["seeded_trials"] == "6"
    import optuna

    name = seeded[0].data.tags["sweep"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/ray_results/{name}/optuna.db")
    assert len(study.trials) == 8 and sum("seeded_from" in t.user_attrs for t in study.trials) == 6
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len(_children(client, name)[1]) == 2  # the seeded trials stay in their own sweep

    tree["base"]["finetune"]["epochs"] = 3
    tree["scheduler"]["max_t"] = 3
    changed = write_yaml(tmp_path / "changed.yaml", tree)
    assert main(["--space", str(changed), "--seed-from", "n1", "--tracking-uri", uri]) == 2
    assert "key 'base.finetune.epochs'" in capsys.readouterr().out
