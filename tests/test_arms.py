"""Arms (issue 18): conditional ranges, equal budgets per arm, the confirmation over seeds and the paired
comparison. Unit checks on Optuna and scipy directly; the end to end sweep on real Ray and a real sqlite MLflow."""
from __future__ import annotations

import copy
import math
import statistics

import optuna
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from roli_sweep.cli import main
from roli_sweep.comparison import PairedDifference, compare
from roli_sweep.config import ConfigError, parse_search_space
from roli_sweep.records import TrialRow, TrialState
from roli_sweep.tune.searcher import ArmedSearch, DefineByRun, TruthfulOptunaSearch
from roli_sweep.widening import widened_parameters
from tests.conftest import write_yaml
from tests.test_sweep import NARROW_LR

ROLI_LR = {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-3}
RANLI_LR = {"distribution": "log_uniform_values", "min": 1e-2, "max": 1e-1}


def _armed(space_dict: dict) -> dict:
    tree = copy.deepcopy(space_dict)
    tree["arms"] = "finetune.head_init"
    tree["parameters"]["finetune.lr"] = {"given": "finetune.head_init", "cases": {"roli": ROLI_LR, "random": RANLI_LR}}
    return tree


def test_each_case_samples_its_own_range_define_by_run(space_dict):
    """Without arms the case is drawn in the same study; the lr then comes from that case's range only."""
    tree = _armed(space_dict)
    del tree["arms"]
    space = parse_search_space(tree, "space")
    define = DefineByRun(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        assert define(trial) is None
        init = trial.params["finetune.head_init"]
        [(name, lr)] = [(k, v) for k, v in trial.params.items() if k.startswith("finetune.lr")]
        case = ROLI_LR if init == "roli" else RANLI_LR
        assert name == f"finetune.lr|finetune.head_init={init}" and case["min"] <= lr <= case["max"]
        assert define.distributions(trial.params) is not None
        seen.add(init)
        study.tell(trial, 0.5)
    assert seen == {"roli", "random"}
    # a point outside the (new) space is no point of it
    assert define.distributions({"finetune.head_init": "roli", "finetune.lr|finetune.head_init=roli": 0.5,
                                 "finetune.method_params.r": 2}) is None


def test_arms_get_equal_budgets_and_their_own_studies(space_dict):
    tree = _armed(space_dict)
    tree["num_samples"] = 6
    space = parse_search_space(tree, "space")
    storage = optuna.storages.InMemoryStorage()
    searchers = {arm: TruthfulOptunaSearch(space=DefineByRun(space, arm), metric="m", mode="max", storage=storage,
                                           study_name=f"s.{arm}", sampler=optuna.samplers.RandomSampler(seed=1),
                                           finetune_epochs=2) for arm in ("roli", "random")}
    search = ArmedSearch(searchers, per_arm=3, metric="m", mode="max")
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert search.suggest("t6") == ArmedSearch.FINISHED
    assert [c["finetune.head_init"] for c in configs] == ["roli", "random"] * 3
    for config in configs:
        case = ROLI_LR if config["finetune.head_init"] == "roli" else RANLI_LR
        assert case["min"] <= config["finetune.lr"] <= case["max"] and set(config) == set(space.parameters)
    for i, config in enumerate(configs):
        search.on_trial_complete(f"t{i}", {"m": 0.1 * i, "epoch": 2})
    for arm in ("roli", "random"):
        study = optuna.load_study(study_name=f"s.{arm}", storage=storage)
        assert len(study.trials) == 3 and {t.state.name for t in study.trials} == {"COMPLETE"}
        assert "finetune.head_init" not in study.trials[0].params  # the arm is fixed, not sampled


def test_cases_are_keyed_as_yaml_writes_the_values(space_dict, tmp_path):
    """``r: [2, 4]`` read from YAML: cases ``{2: ..., 4: ...}`` have int keys, and name the cases all the same."""
    tree = copy.deepcopy(space_dict)
    tree["parameters"]["finetune.lr"] = {"given": "finetune.method_params.r", "cases": {2: ROLI_LR, 4: RANLI_LR}}
    from roli_sweep.config import load_search_space

    space = load_search_space(write_yaml(tmp_path / "space.yaml", tree))
    assert [(condition, spec.max) for condition, spec in space.conditions("finetune.lr")] == [
        ({"finetune.method_params.r": 2}, 1e-3), ({"finetune.method_params.r": 4}, 1e-1)]


def test_keys_are_made_acceptable_to_mlflow():
    from roli_sweep.tracking import mlflow_key

    assert mlflow_key("diff.r=4-r=8.test_robust_acc") == "diff.r_4-r_8.test_robust_acc"
    assert mlflow_key("importance.finetune.lr|finetune.head_init=roli") == "importance.finetune.lr_finetune.head_init_roli"


def test_arms_must_split_the_budget_evenly(space_dict):
    tree = _armed(space_dict)
    tree["num_samples"] = 5
    with pytest.raises(ConfigError, match=r"num_samples \(5\) must be a multiple of the 2 arms of finetune.head_init"):
        parse_search_space(tree, "space")


def test_the_seed_is_not_sampled_when_the_confirmation_reruns_over_seeds(space_dict):
    tree = _armed(space_dict)
    tree["parameters"]["seed"] = {"values": [0, 1]}
    tree["confirm"] = {"seeds": 3}
    with pytest.raises(ConfigError, match="parameters.seed: the confirmation reruns the best trials over new seeds"):
        parse_search_space(tree, "space")


def test_a_conditional_range_widens_case_by_case(space_dict):
    old = parse_search_space(_armed(space_dict), "old")
    tree = _armed(space_dict)
    tree["parameters"]["finetune.lr"]["cases"]["random"] = dict(RANLI_LR, max=1.0)
    assert widened_parameters(old, parse_search_space(tree, "new")) == ["finetune.lr"]
    tree["parameters"]["finetune.lr"]["cases"]["roli"] = dict(ROLI_LR, max=5e-4)
    with pytest.raises(ConfigError, match=r"parameters\.finetune\.lr\.cases\.roli\.max"):
        widened_parameters(old, parse_search_space(tree, "new"))
    tree = _armed(space_dict)
    tree["confirm"] = {"seeds": 5}  # how much to confirm is not what is searched
    assert widened_parameters(old, parse_search_space(tree, "new")) == []


def _row(seed: int, init: str, robust: float, clean: float = 0.5, status=TrialState.COMPLETED) -> TrialRow:
    return TrialRow(f"{init}{seed}", {"finetune.head_init": init, "finetune.lr": 0.01, "seed": seed}, status, 2,
                    0.5, 0.4, clean, robust)


def test_the_paired_interval_is_students_over_seeds_and_pairs_only_shared_seeds():
    roli = TrialRow("a", {"finetune.head_init": "roli", "finetune.lr": 0.01}, TrialState.COMPLETED, 2, 0.5, 0.4,
                    0.5, 0.4)
    ranli = TrialRow("b", {"finetune.head_init": "random", "finetune.lr": 0.01}, TrialState.COMPLETED, 2, 0.5, 0.3,
                     0.5, 0.3)
    robust = {"roli": [0.40, 0.43, 0.38, 0.45], "random": [0.35, 0.41, 0.30, 0.44]}
    rows = [_row(s, init, robust[init][s - 1]) for init in robust for s in range(1, 5)]
    rows[-1] = _row(4, "random", 0.44, status=TrialState.FAILED)  # seed 4 failed for RanLI: left out of the pair
    found = compare(rows, [("RanLI", 1, ranli), ("RoLI", 1, roli)], "finetune.head_init", [1, 2, 3, 4])
    diff = next(d for d in found.differences if d.metric == "test_robust_acc")
    assert (diff.first, diff.second, diff.seeds) == ("RoLI", "RanLI", [1, 2, 3])  # RoLI - RanLI whatever the order
    reference = stats.ttest_rel(robust["roli"][:3], robust["random"][:3]).confidence_interval(0.95)
    assert diff.mean == pytest.approx(statistics.fmean([0.05, 0.02, 0.08]))
    assert diff.interval == pytest.approx((reference.low, reference.high))
    assert "3 paired seeds" in diff.caveat() and "t = 4.30" in diff.caveat()
    assert [len(a.runs) for a in found.arms] == [3, 4] and found.arms[0].failed == 1
    assert PairedDifference("RoLI", "RanLI", "test_robust_acc", [1], [0.1]).interval is None
    assert math.isclose(PairedDifference("a", "b", "m", [1, 2], [0.1, 0.1]).interval[0], 0.1)


ARMED = {
    **copy.deepcopy(NARROW_LR), "name": "armed", "num_samples": 12, "final_top_k": 1, "arms": "finetune.head_init",
    # RanLI is the first arm, so its study's sampler has NARROW_LR's seed 319: its first 3 draws (random start-up,
    # half its 6 trials) are 9.96e-3, 8.23e-3 and 1.39e-3, at this base's best RanLI lrs
    "confirm": {"seeds": 2},
    "parameters": {
        "finetune.head_init": {"values": ["random", "roli"]},
        "finetune.lr": {"given": "finetune.head_init", "cases": {
            "random": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
            "roli": {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2}}},
    },
}
ARMED["base"]["eval"]["final"] = {"n_examples": 8, "masking": {"n_examples": 8, "more_steps": 10, "square_queries": 20}}


@pytest.mark.extended  # about 100 s; the default run's armed paper presets sweep, confirm and export per arm too
def test_an_armed_sweep_searches_each_arm_equally_confirms_over_seeds_and_compares(tmp_path, monkeypatch,
                                                                                   ray_runtime, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--space", str(write_yaml(tmp_path / "armed.yaml", ARMED)), "--name", "a1",
                 "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(uri)
    [parent] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.sweep = 'a1' and tags.sweep_role = 'parent'")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    search = [c for c in children if c.data.tags["sweep_role"] == "trial"]
    confirmation = [c for c in children if c.data.tags["sweep_role"] == "confirmation"]
    # equal budgets, each arm in its own Optuna study, each lr in its arm's range
    assert sorted(c.data.tags["arm"] for c in search) == ["RanLI"] * 6 + ["RoLI"] * 6
    for arm, init, high in (("RanLI", "random", 1e-2), ("RoLI", "roli", 3e-2)):
        study = optuna.load_study(study_name=f"a1.{init}", storage=f"sqlite:///{tmp_path}/ray_results/a1/optuna.db")
        assert len(study.trials) == 6
        assert all(1e-3 <= float(c.data.tags["sampled.finetune.lr"]) <= high for c in search if c.data.tags["arm"] == arm)
    assert "RanLI's finetune.lr: range [0.001, 0.01] (log): the best trials ran at" in printed
    assert parent.data.tags["search_space.edge.RanLI.finetune.lr"].startswith("RanLI's finetune.lr: range")
    # each arm's best rerun over seeds 1 and 2 (never the search's seed 0), paired seed by seed
    assert sorted((c.data.tags["arm"], c.data.params["seed"]) for c in confirmation) == [
        ("RanLI", "1"), ("RanLI", "2"), ("RoLI", "1"), ("RoLI", "2")]
    for arm in ("RanLI", "RoLI"):
        done = [c for c in search if c.data.tags["arm"] == arm and c.data.tags["status"] == "completed"]
        mine = [c for c in confirmation if c.data.tags["arm"] == arm]
        [source] = {c.data.tags["confirms"] for c in mine}
        best = next(c for c in done if c.data.tags["trial_id"] == source)  # the arm's best (ties: any of them)
        assert best.data.metrics["best_val_robust_acc"] == max(c.data.metrics["best_val_robust_acc"] for c in done)
        assert all(c.data.params["finetune.lr"] == best.data.params["finetune.lr"] for c in mine)
        assert "final_eval" in best.data.tags  # the final evaluation ran on each arm's confirmed best
    robust = {(c.data.tags["arm"], c.data.params["seed"]): c.data.metrics["test_robust_acc"] for c in confirmation}
    differences = [robust[("RoLI", s)] - robust[("RanLI", s)] for s in ("1", "2")]
    m = parent.data.metrics
    assert m["diff.RoLI-RanLI.test_robust_acc"] == pytest.approx(statistics.fmean(differences))
    assert m["diff.RoLI-RanLI.test_robust_acc_n"] == 2
    half = stats.t.ppf(0.975, 1) * statistics.stdev(differences) / math.sqrt(2)
    assert m["diff.RoLI-RanLI.test_robust_acc_ci_low"] == pytest.approx(statistics.fmean(differences) - half)
    assert m["confirm.RoLI.rank1.test_robust_acc_mean"] == pytest.approx(
        statistics.fmean([robust[("RoLI", s)] for s in ("1", "2")]))
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert {"comparison.md", "paired_seeds.png"} <= set(artifacts)
    assert "RoLI - RanLI test robust:" in printed and "2 paired seeds" in printed
    assert "each arm's best search trial" in printed
    # export writes each arm's best search trials (never a confirmation run)
    assert main(["export", "--name", "a1", "--top-k", "1", "--out", str(tmp_path / "ex"), "--tracking-uri", uri]) == 0
    exported = sorted((tmp_path / "ex").iterdir())
    assert [p.name.split("-rank1-")[0] for p in exported] == ["a1-RanLI", "a1-RoLI"]
    assert all(", arm " in p.read_text().splitlines()[0] for p in exported)


def test_the_grid_benchmark_spans_each_arm_with_its_own_range(space_dict, tmp_path, ray_runtime):
    """``benchmarks/grid.py`` (the search-efficiency baseline): one grid per arm, its lr points from the arm's case,
    every point a whole trial that completes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from grid import run_grid, space_grids

    tree = _armed(space_dict)
    tree["parameters"]["finetune.method_params.r"] = {"values": [2]}
    space = parse_search_space(tree, "space")
    grids = space_grids(space, 2)
    assert [(arm, g["finetune.lr"]) for arm, g in grids] == [("roli", [1e-4, 1e-3]), ("random", [1e-2, 1e-1])]
    points = run_grid(space, grids[1][1], tmp_path, "grid", tmp_path / "cache")
    assert sorted(p.settings["finetune.lr"] for p in points) == [1e-2, 1e-1]
    assert all(p.error is None and 0 <= p.test_robust_acc <= 1 and p.core_seconds > 0 for p in points)
