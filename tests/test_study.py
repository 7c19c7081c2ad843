"""The F1-F3 study end to end: real Ray (num_cpus=2), real sqlite MLflow, a tiny grid."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from roli_sweep.config import ConfigError, StudyConfig
from roli_sweep.study.run import StudyState, choose_lrs, parse_filters
from roli_sweep.study.report import collect_cells, lr_grid_edges
from tests.conftest import write_yaml


@pytest.fixture
def study_dict(trial_dict, tiny_weights) -> dict:
    base = {k: v for k, v in trial_dict.items() if k not in ("data",)}
    base["finetune"] = {**base["finetune"], "epochs": 1}
    # 8 final evaluations: a cut AutoAttack keeps them short (the sweep test runs the published one)
    base["eval"] = {**base["eval"], "final": {**base["eval"]["final"], "autoattack": {
        "apgd_steps": 5, "fab_steps": 5, "square_queries": 50}}}
    return {
        "name": "tiny_study",
        "base": base,
        "backbones": {"a": str(tiny_weights), "b": str(tiny_weights)},
        "targets": {"digits": {"name": "digits", "train_size": 48, "val_size": 24, "test_size": 24}},
        "methods": {"lora": {"params": {"r": 2, "alpha": 2}, "lrs": [1e-3, 1e-2]}, "bias": {"lrs": [1e-2]}},
        "seeds": [0, 1],
    }


def test_study_runs_resumes_and_reports(tmp_path, monkeypatch, ray_runtime, study_dict):
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "tiny_study.yaml", study_dict)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "results"
    # part 1: backbone a only
    assert main(["study", "--config", str(config), "--out", str(out), "--tracking-uri", uri,
                 "--only", "backbone=a", "--no-final"]) == 0
    runs = sorted(p.stem for p in (out / "tiny_study" / "runs").glob("*.json"))
    assert runs and all(r.startswith("a-") for r in runs)
    # selection: every lr of every cell with seed 0; then seed 1 at the chosen lrs only
    study = StudyConfig.model_validate(study_dict)
    state = StudyState(out / "tiny_study", study)
    choice = choose_lrs(study, state, ("a", "digits", "lora"))
    expected_seed1 = {f"a-digits-lora-{init}-lr{lr:.3g}-s1" for init in ("random", "roli")
                      for lr in {choice.own[init], choice.matched}}
    assert {r for r in runs if r.startswith("a-digits-lora") and r.endswith("s1")} == expected_seed1
    assert len([r for r in runs if r.endswith("s0")]) == 2 * (2 + 1)  # inits x (lora lrs + bias lrs)

    # part 2: the rest, with the final evaluation; part 1's runs are not run again
    before = {p: p.stat().st_mtime for p in (out / "tiny_study" / "runs").glob("*.json")}
    assert main(["study", "--config", str(config), "--out", str(out), "--tracking-uri", uri]) == 0
    assert all(p.stat().st_mtime == t for p, t in before.items())
    finals = sorted((out / "tiny_study" / "final").glob("*-s0.json"))
    assert len(finals) == 2 * 2 * 2  # backbones x methods x inits, seed 0 at the own lr
    record = json.loads(finals[0].read_text())
    assert record["status"] == "completed" and "final_autoattack_acc" in record["metrics"]

    report = (out / "tiny_study" / "report" / "RESULTS.md").read_text()
    assert "| a | digits | lora |" in report and "| b | digits | bias |" in report
    # test means also without the seed that chose each lr on val
    assert "## Finetuning on the seeds that did not choose the lr" in report and "held-out seeds" in report
    cells = collect_cells(study, StudyState(out / "tiny_study", study))
    assert cells
    for cell in cells:
        for init in ("random", "roli"):
            own, held_out = cell.own[init]["test_robust_acc"], cell.own_held_out[init]["test_robust_acc"]
            assert own.n == len(study.seeds) and held_out.values == own.values[1:]
    assert "**F3" in report and "AutoAttack" in report
    for png in ("clean_vs_robust.png", "roli_minus_ranli.png", "robust_vs_standard.png"):
        assert (out / "tiny_study" / "report" / png).stat().st_size > 1000

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_study").experiment_id
    parent = client.search_runs([exp], filter_string="tags.sweep_role = 'study_parent'")
    assert len(parent) == 1
    children = client.search_runs([exp], filter_string="tags.sweep_role = 'study_run'", max_results=1000)
    all_runs = list((out / "tiny_study" / "runs").glob("*.json"))
    assert len(children) == len(all_runs)  # resumed: no duplicates
    assert all(c.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for c in children)
    evaluated = [c for c in children if "masking" in c.data.tags]
    assert len(evaluated) == len(finals)
    artifacts = [a.path for a in client.list_artifacts(parent[0].info.run_id, "report")]
    assert "report/RESULTS.md" in artifacts and "report/roli_minus_ranli.png" in artifacts
    # the cells whose lr won at an end of its grid: in the report and as the parent's tags
    edges = lr_grid_edges(study, cells)
    assert "## lr grid edges" in report and all(w.message in report for w in edges.values())
    assert {k: v for k, v in parent[0].data.tags.items() if k.startswith("search_space.edge.")} == {
        f"search_space.edge.finetune.lr.{where}": w.message for where, w in edges.items()}


def test_study_bad_input_exits_2_and_starts_nothing(tmp_path, monkeypatch, study_dict):
    monkeypatch.chdir(tmp_path)
    bad = dict(study_dict, methods={"lora": {"params": {"rank": 2}, "lrs": [1e-3]}})
    assert main(["study", "--config", str(write_yaml(tmp_path / "bad.yaml", bad))]) == 2
    good = write_yaml(tmp_path / "good.yaml", study_dict)
    assert main(["study", "--config", str(good), "--only", "colour=red"]) == 2
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "study_results").exists()
    with pytest.raises(ConfigError, match="key=value"):
        parse_filters(["backbone"])


def test_the_study_report_names_the_cells_whose_lr_won_at_a_grid_end(study_dict):
    from types import SimpleNamespace

    study_dict["methods"]["lora"]["lrs"] = [1e-3, 3e-3, 1e-2]
    study = StudyConfig.model_validate(study_dict)
    cells = [SimpleNamespace(backbone="a", target="digits", method="lora",
                             choice=SimpleNamespace(own={"roli": 1e-2, "random": 3e-3}))]
    edges = lr_grid_edges(study, cells)
    assert list(edges) == ["a-digits-lora-roli"] and edges["a-digits-lora-roli"].bound == "max"


def test_a_grid_per_head_init_selects_each_init_on_its_own_grid(study_dict):
    from pydantic import ValidationError

    from roli_sweep.study.run import selection_runs

    study_dict["methods"]["lora"]["lrs"] = {"random": [1e-2, 3e-2], "roli": [1e-3]}
    study = StudyConfig.model_validate(study_dict)
    lora = {(k.head_init, k.lr) for k in selection_runs(study) if k.method == "lora" and k.backbone == "a"}
    assert lora == {("random", 1e-2), ("random", 3e-2), ("roli", 1e-3)}
    study_dict["methods"]["lora"]["lrs"] = {"roli": [1e-3]}  # RanLI's grid missing
    with pytest.raises(ValidationError, match="methods.lora.lrs: one grid per head init needs exactly the keys"):
        StudyConfig.model_validate(study_dict)


def test_f3_power_matches_a_simulated_paired_t_test():
    import numpy as np
    from scipy import stats

    from roli_sweep.comparison import paired_t_power, pairs_for_power

    assert paired_t_power(3.0, 12, 0.0) == pytest.approx(0.05)  # no effect: the test's level
    rng = np.random.default_rng(0)
    draws = rng.normal(2.0, 3.0, (20_000, 12))
    simulated = (stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05).mean()
    assert paired_t_power(3.0, 12, 2.0) == pytest.approx(simulated, abs=0.015)
    n = pairs_for_power(3.0, 2.0)
    assert paired_t_power(3.0, n, 2.0) >= 0.8 > paired_t_power(3.0, n - 1, 2.0)
