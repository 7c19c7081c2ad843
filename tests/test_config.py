"""Search spaces and trial configs: every shipped YAML validates; malformed ones exit 2 naming the key."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from roli_sweep.cli import main
from roli_sweep.config import ConfigError, TrialConfig, apply_overrides, load_search_space
from tests.conftest import write_yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))  # paper presets: tests/test_paper_presets.py


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: p.name)
def test_shipped_search_spaces_validate(path):
    space = load_search_space(path)
    assert space.parameters, "a shipped space samples something"
    assert space.base.backbone.weights, "a shipped space starts from pretrained weights"


def test_eps_written_as_fraction():
    cfg = TrialConfig.model_validate({"backbone": {"name": "vit_tiny_patch16_224"}, "attack": {"eps": "8/255"}})
    assert cfg.attack.eps == pytest.approx(8 / 255)


def test_overrides_fill_method_params(trial_dict):
    cfg = apply_overrides(TrialConfig.model_validate(trial_dict), {"finetune.method_params.r": 16, "finetune.lr": 0.01})
    assert cfg.finetune.method_params["r"] == 16 and cfg.finetune.lr == 0.01
    with pytest.raises(ConfigError, match="finetune.nope"):
        apply_overrides(cfg, {"finetune.nope": 1})


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree[key]
    if value is _DELETE:
        del tree[leaf]
    else:
        tree[leaf] = value


_DELETE = object()

LOG = {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
MALFORMED = [
    # (path in the YAML tree, bad value, text the error must contain)
    ("surprise", 1, "surprise"),
    ("num_samples", 0, "num_samples"),
    ("max_concurrent", "two", "max_concurrent"),
    ("resources/cpu", -1, "resources.cpu"),
    ("scheduler/max_t", 50, "max_t"),
    ("scheduler/max_t", 1, "max_t"),
    ("scheduler/grace_period", 0, "grace_period"),
    ("metric/name", "test_robust_acc", "metric.name"),
    ("base/data/name", "imagenet21k", "base.data.name"),
    ("base/attack/eps", 2.0, "base.attack.eps"),
    ("base/attack/steps", -3, "base.attack.steps"),
    ("base/attack/eps", True, "base.attack.eps"),
    ("base/probe/epochs", "3", "base.probe.epochs"),
    ("base/finetune/method", "prefix_tuning", "base.finetune"),
    ("base/finetune/head_init", "zeros", "base.finetune.head_init"),
    ("base/finetune/method_params", {"rank": 4}, "method_params.rank"),
    ("base/backbone/weights", "shipped:no_such_backbone", "base.backbone.weights"),
    ("base/backbone/name", "not_a_timm_model", "base.backbone.name"),
    ("base/backbone", _DELETE, "base.backbone"),
    ("parameters/finetune.lrr", {"values": [0.1]}, "finetune.lrr"),
    ("parameters/finetune.lr", {"distribution": "log_uniform_values", "min": 0, "max": 1}, "parameters.finetune.lr"),
    ("parameters/finetune.lr", {"distribution": "uniform", "min": 1, "max": 0.1}, "parameters.finetune.lr"),
    ("parameters/finetune.lr", {"values": []}, "parameters.finetune.lr"),
    ("parameters/finetune.lr", {"values": [0.1], "distribution": "uniform", "min": 0, "max": 1}, "parameters.finetune.lr"),
    ("parameters/finetune.lr", {"distribution": "normal", "min": 0, "max": 1}, "parameters.finetune.lr.distribution"),
    ("parameters/finetune.lr", {"values": [0.001, -1.0]}, "parameters.finetune.lr"),
    ("parameters/attack.step_size", {"values": ["2/255", 1.5]}, "parameters.attack.step_size"),
    # one threat model for every trial: sampling the training eps needs a fixed evaluation eps
    ("parameters/attack.eps", {"values": ["8/255", "12/255"]},
     "parameters.attack.eps: sampling it changes the evaluation threat model"),
    ("parameters/attack.step_size", {"values": ["1/255", "2/255"]}, "base.eval.eps"),
    ("parameters/eval.val_steps", {"values": [5, 10]}, "parameters.eval.val_steps: sampling it changes"),
    ("parameters/finetune.method_params.r", {"values": [0, 4]}, "parameters.finetune.method_params.r"),
    ("parameters/finetune.epochs", {"values": [1, 2]}, "finetune.epochs"),
    ("parameters/finetune.method_params.r", {"distribution": "uniform", "min": 2, "max": 8},
     "parameters.finetune.method_params.r"),
    # conditional ranges and arms
    ("parameters/finetune.lr", {"given": "finetune.headinit", "cases": {"roli": LOG, "random": LOG}},
     "parameters.finetune.lr.given: 'finetune.headinit' is not another sampled parameter"),
    ("parameters/finetune.lr", {"given": "finetune.head_init", "cases": {"roli": LOG}},
     "parameters.finetune.lr.cases: keys ['roli'] must be the values of finetune.head_init, ['roli', 'random']; "
     "missing ['random']"),
    ("parameters/finetune.lr", {"given": "finetune.head_init", "cases": {"roli": LOG, "random": LOG, "linear": LOG}},
     "not values of it ['linear']"),
    ("parameters/finetune.method_params.r", {"given": "finetune.lr", "cases": {"1": {"values": [2]}}},
     "parameters.finetune.method_params.r.given: finetune.lr must be categorical"),
    ("parameters/finetune.lr", {"given": "finetune.head_init", "min": 1e-4, "cases": {"roli": LOG, "random": LOG}},
     "a conditional parameter takes 'given' and 'cases' only"),
    ("parameters/finetune.lr", {"given": "finetune.head_init", "cases": {"roli": LOG, "random": {"values": [-1.0]}}},
     "parameters.finetune.lr (when finetune.head_init is 'random'): value -1.0"),
    ("arms", "finetune.lr", "arms: 'finetune.lr' must be a categorical sampled parameter"),
]


@pytest.mark.parametrize("path,value,expected", MALFORMED, ids=[m[0] + ":" + str(m[1])[:20] for m in MALFORMED])
def test_malformed_search_space_exits_2_naming_the_key(tmp_path, monkeypatch, capsys, space_dict, path, value, expected):
    tree = copy.deepcopy(space_dict)
    _set(tree, path, value)
    space = write_yaml(tmp_path / "bad.yaml", tree)
    monkeypatch.chdir(tmp_path)
    status = main(["--space", str(space), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = capsys.readouterr().out
    assert status == 2
    assert expected in out.replace("\n", " "), out
    assert not (tmp_path / "mlflow.db").exists(), "nothing may start on bad input"
    assert not (tmp_path / "ray_results").exists()


def test_bad_sweep_name_exits_2(tmp_path, capsys, space_dict):
    space = write_yaml(tmp_path / "ok.yaml", space_dict)
    assert main(["--space", str(space), "--name", "x' or '1'='1"]) == 2
    assert "--name" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["[1, 2]", "base: {seed: [unclosed", ""])
def test_unreadable_yaml_exits_2(tmp_path, capsys, text):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["--space", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().out


def test_missing_file_and_bad_flags_exit_2(tmp_path, capsys, space_dict):
    assert main(["--space", str(tmp_path / "nope.yaml")]) == 2
    space = write_yaml(tmp_path / "ok.yaml", space_dict)
    assert main(["--space", str(space), "--num-samples", "0"]) == 2
    assert main(["--space", str(space), "--resume"]) == 2
    out = capsys.readouterr().out
    assert "nope.yaml" in out and "--num-samples" in out and "--resume" in out


def test_evaluation_threat_model_defaults_to_training_attack(trial_dict):
    from roli_sweep.config import evaluation_attack

    cfg = TrialConfig.model_validate(trial_dict)
    assert evaluation_attack(cfg.attack, cfg.eval) == cfg.attack
    cfg = apply_overrides(cfg, {"eval.eps": "4/255", "attack.eps": "12/255"})
    fixed = evaluation_attack(cfg.attack, cfg.eval)
    assert fixed.eps == pytest.approx(4 / 255) and fixed.step_size is None and fixed.random_start
