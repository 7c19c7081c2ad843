"""The two-stage trial: RoLI starts stage 2 from the probe's head, RanLI from the random one."""
from __future__ import annotations

import pytest
import torch

from roli_sweep.config import TrialConfig
from roli_sweep.trial import ProbeOutcome, init_finetune_head, prepare, probe_and_test, run_probe, run_trial


@pytest.mark.parametrize("head_init", ["roli", "random"])
def test_stage_two_head_starts_where_it_should(trial_dict, head_init):
    trial_dict["finetune"]["head_init"] = head_init
    cfg = TrialConfig.model_validate(trial_dict)
    prep = prepare(cfg)
    probe = run_probe(cfg, prep, lambda stage, m: None)
    assert not torch.equal(probe.head["weight"], prep.initial_head["weight"]), "the probe trained the head"
    init_finetune_head(cfg, prep, probe)
    expected = probe.head if head_init == "roli" else prep.initial_head
    for key, value in prep.model.head.state_dict().items():
        assert torch.equal(value, expected[key])


def test_probe_trains_only_the_head(trial_dict):
    cfg = TrialConfig.model_validate(trial_dict)
    prep = prepare(cfg)
    backbone_before = {n: p.detach().clone() for n, p in prep.model.named_parameters() if "head" not in n}
    run_probe(cfg, prep, lambda stage, m: None)
    for n, p in prep.model.named_parameters():
        if "head" not in n:
            assert torch.equal(p, backbone_before[n]), n


def test_trial_reports_every_finetune_epoch_and_tests_once(trial_dict):
    seen = []
    result = run_trial(TrialConfig.model_validate(trial_dict), lambda stage, m: seen.append((stage, dict(m))))
    stages = [s for s, _ in seen]
    assert stages == ["probe", "finetune", "finetune"]
    last = seen[-1][1]
    assert [m["epoch"] for s, m in seen if s == "finetune"] == [1, 2]
    assert "test_robust_acc" in last and "test_robust_acc" not in seen[1][1]
    for key in ("val_clean_acc", "val_robust_acc", "probe_val_robust_acc", "test_clean_acc"):
        assert 0.0 <= result.metrics[key] <= 1.0
    assert result.metrics["test_robust_acc"] <= result.metrics["test_clean_acc"] + 0.1
    assert result.metrics["val_robust_acc"] == max(m["val_robust_acc"] for s, m in seen if s == "finetune")


def test_same_seed_same_result(trial_dict):
    cfg = TrialConfig.model_validate(trial_dict)
    a, b = run_trial(cfg), run_trial(cfg)
    assert a.metrics["val_robust_acc"] == b.metrics["val_robust_acc"]
    assert a.metrics["test_clean_acc"] == b.metrics["test_clean_acc"]


def test_probe_keeps_the_frozen_backbone_in_eval_mode(trial_dict):
    trial_dict["backbone"]["kwargs"]["drop_rate"] = 0.5  # dropout in the frozen backbone must stay off
    cfg = TrialConfig.model_validate(trial_dict)
    prep = prepare(cfg)
    modes = []
    hook = prep.model.net.blocks.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    run_probe(cfg, prep, lambda stage, m: None)
    hook.remove()
    assert modes and not any(modes)


def test_bf16_autocast_runs_a_trial(trial_dict):
    """The GPU path's mixed precision, exercised on CPU (torch.autocast supports bf16 there too)."""
    from roli_sweep.train import make_runtime

    assert make_runtime("cpu", "auto", 0).autocast_dtype is None
    assert make_runtime("cpu", "bf16", 0).autocast_dtype == torch.bfloat16
    trial_dict["precision"] = "bf16"
    result = run_trial(TrialConfig.model_validate(trial_dict))
    assert 0.0 <= result.metrics["test_robust_acc"] <= 1.0


def test_a_method_that_does_not_fit_fails_before_the_probe(trial_dict):
    trial_dict["backbone"] = {"name": "resnet18", "kwargs": {"in_chans": 1}}
    trial_dict["finetune"].update(method="prompt", method_params={})
    seen = []
    with pytest.raises(ValueError, match="VisionTransformer"):
        run_trial(TrialConfig.model_validate(trial_dict), lambda stage, m: seen.append(stage))
    assert seen == [], "no epoch may run"


@pytest.mark.parametrize("head_init", ["roli", "random"])
def test_a_saved_probe_gives_the_same_trial(tmp_path, trial_dict, head_init):
    """A study computes stage 1 once and shares it: the trial must not change."""
    cfg = TrialConfig.model_validate({**trial_dict, "finetune": {**trial_dict["finetune"], "head_init": head_init}})
    probe = probe_and_test(cfg)
    assert 0.0 <= probe.metrics["probe_test_robust_acc"] <= probe.metrics["probe_test_clean_acc"] <= 1.0
    probe.save(tmp_path / "probe.safetensors")
    loaded = ProbeOutcome.load(tmp_path / "probe.safetensors")
    assert loaded.metrics == probe.metrics
    with_probe = run_trial(cfg, probe=loaded).metrics
    alone = run_trial(cfg).metrics
    for key in ("val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc", "probe_val_robust_acc"):
        assert with_probe[key] == alone[key], key
