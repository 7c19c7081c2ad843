"""The two-stage trial: RoLI starts stage 2 from the probe's head, RanLI from the random one."""
from __future__ import annotations

import pytest
import torch

from roli_sweep.config import TrialConfig
from roli_sweep.core.probe_cache import ProbeOutcome
from roli_sweep.core.trial import init_finetune_head, prepare, probe_and_test, run_probe, run_trial


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
    assert stages == ["probe", "probe_done", "finetune", "finetune"]
    assert seen[1][1]["epoch"] == 0 and "probe_val_robust_acc" in seen[1][1]
    last = seen[-1][1]
    assert [m["epoch"] for s, m in seen if s == "finetune"] == [1, 2]
    assert "test_robust_acc" in last and "test_robust_acc" not in seen[2][1]
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
    from roli_sweep.core.train import make_runtime

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


def test_a_cached_probe_gives_the_same_trial_and_the_key_follows_stage_one(tmp_path, trial_dict):
    """The sweep's probe cache: the second trial with the same probe settings reads stage 1, and its metrics are
    those of a trial without any cache; settings stage 1 ignores share a key, those it uses do not."""
    from roli_sweep.core.probe_cache import ProbeCache, probe_key

    cfg = TrialConfig.model_validate(trial_dict)
    other = TrialConfig.model_validate({**trial_dict, "finetune": {**trial_dict["finetune"], "lr": 5e-3,
                                                                   "head_init": "random"}})
    assert probe_key(cfg) == probe_key(other)
    for change in ({"seed": 1}, {"attack": {**trial_dict["attack"], "eps": "4/255"}},
                   {"probe": {**trial_dict["probe"], "lr": 0.1}}, {"finetune": {**trial_dict["finetune"],
                                                                                  "random_head_init": "timm"}}):
        assert probe_key(TrialConfig.model_validate({**trial_dict, **change})) != probe_key(cfg), change
    cache = ProbeCache(tmp_path / "cache")
    seen: list[dict] = []

    def on_epoch(stage, metrics):
        if stage == "probe_done":
            seen.append(metrics)

    first = run_trial(cfg, on_epoch, probe_cache=cache).metrics
    second = run_trial(cfg, on_epoch, probe_cache=cache).metrics
    alone = run_trial(cfg).metrics
    assert [m["probe"] for m in seen] == ["computed", "cached"] and seen[0]["probe_key"] == probe_key(cfg)
    assert seen[1]["probe_seconds"] == pytest.approx(seen[0]["probe_seconds"])  # the compute the cache saved
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    for key in ("val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc", "probe_val_robust_acc"):
        assert first[key] == second[key] == alone[key], key


def _finetune_model(cfg: TrialConfig):
    """The stage-2 model of ``cfg`` (method applied, RanLI head) and its train-mode modules."""
    from roli_sweep.models.methods import apply_method
    from roli_sweep.core.trial import finetune_train_modules

    prep = prepare(cfg)
    backbone_modules = set(prep.model.modules()) - set(prep.model.head.modules())
    apply_method(prep.model, cfg.finetune.method, cfg.finetune.method_params)
    return prep, finetune_train_modules(cfg, prep.model, backbone_modules)


@pytest.mark.parametrize("mode", ["auto", "train"])
def test_frozen_backbone_stays_in_eval_mode_while_lora_finetunes(trial_dict, mode):
    """drop-path 0.5 in the frozen backbone: with the reference's modes it never acts during a LoRA finetuning
    epoch (PGD included) and the frozen part gives identical features on two forward passes; with the whole
    model in train mode it acts and they differ."""
    from roli_sweep.core.train import adversarial_epoch, make_loader, make_optimizer, set_train_modes, warmup_cosine

    # two blocks: timm spreads drop-path linearly over the blocks from 0, so the second gets 0.5
    trial_dict["backbone"].update(weights=None, kwargs={**trial_dict["backbone"]["kwargs"], "depth": 2,
                                                        "drop_path_rate": 0.5})
    trial_dict["finetune"].update(backbone_mode=mode, method_params={"r": 4, "alpha": 4, "dropout": 0.0})
    cfg = TrialConfig.model_validate(trial_dict)
    prep, train_modules = _finetune_model(cfg)
    assert (train_modules is None) == (mode == "train")
    drop_path = prep.model.net.blocks[1].drop_path1
    assert drop_path.drop_prob == 0.5
    modes = []
    drop_path.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    loader = make_loader(torch.utils.data.Subset(prep.splits.train, range(16)), 8, False, 0, prep.runtime.device)
    optimizer = make_optimizer(prep.model, cfg.finetune)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.finetune, len(loader)))
    adversarial_epoch(prep.model, loader, optimizer, scheduler, cfg.attack, prep.runtime, train_modules)
    assert modes and any(modes) == (mode == "train")  # PGD's passes run in eval mode either way
    lora = [m for n, m in prep.model.named_modules() if n.endswith("lora_A.default")]
    assert lora and all(m.training for m in lora) and prep.model.head.training
    features = []
    prep.model.head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    x = next(iter(loader))[0]
    set_train_modes(prep.model, train_modules)  # as during the training steps
    prep.model(x), prep.model(x)
    assert torch.equal(features[0], features[1]) == (mode == "auto")


def test_full_finetuning_trains_the_whole_model(trial_dict):
    trial_dict["finetune"].update(method="full", method_params={})
    prep, train_modules = _finetune_model(TrialConfig.model_validate(trial_dict))
    assert train_modules is None


@pytest.mark.parametrize("scheme", ["reference", "timm"])
def test_random_head_init(trial_dict, scheme):
    """RanLI's head, which the probe starts from too: the RoLI reference's init (std sqrt(2 / K), bias -ln 99)
    or timm's (std 0.02 weight, zero bias)."""
    trial_dict["finetune"]["random_head_init"] = scheme
    prep = prepare(TrialConfig.model_validate(trial_dict))
    weight, bias = prep.initial_head["weight"], prep.initial_head["bias"]  # (K, D), (K,)
    assert torch.equal(prep.model.head.weight, weight)
    if scheme == "reference":
        assert weight.std().item() == pytest.approx((2 / weight.shape[0]) ** 0.5, rel=0.2)
        assert torch.allclose(bias, torch.full_like(bias, -4.59512), atol=1e-4)
    else:
        assert weight.std().item() < 0.05 and torch.equal(bias, torch.zeros_like(bias))
    # the same head whatever the method and its parameters: a study's shared probe starts where RanLI does
    for method, params in (("linear", {}), ("lora", {"r": 2}), ("prompt", {"length": 3}), ("adapter", {})):
        trial_dict["finetune"].update(method=method, method_params=params)
        other = prepare(TrialConfig.model_validate(trial_dict)).initial_head
        assert all(torch.equal(other[k], prep.initial_head[k]) for k in other), method


def test_weight_decay_spares_biases_norms_and_embeddings(trial_dict):
    from roli_sweep.core.train import make_optimizer

    trial_dict["finetune"].update(method="full", method_params={}, optimizer="adamw", weight_decay=0.05)
    cfg = TrialConfig.model_validate(trial_dict)
    prep, _ = _finetune_model(cfg)
    names = {id(p): n for n, p in prep.model.named_parameters()}
    decayed, spared = make_optimizer(prep.model, cfg.finetune).param_groups
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    spared_names = {names[id(p)] for p in spared["params"]}
    assert {"net.pos_embed", "net.cls_token", "net.head.bias", "net.norm.weight"} <= spared_names
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decayed["params"])
    (one,) = make_optimizer(prep.model, cfg.finetune.model_copy(update={"no_weight_decay": []})).param_groups
    assert one["weight_decay"] == 0.05 and len(one["params"]) == len(names)


def test_saved_state_keeps_persistent_buffers_only():
    from roli_sweep.core.stage import state_of

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model[1].register_buffer("rebuilt", torch.zeros(2), persistent=False)
    model[0].requires_grad_(False)
    assert set(state_of(model, {"1.weight", "1.bias"})) == {
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_load_trained_rebuilds_the_tested_model(tmp_path, trial_dict):
    from roli_sweep.core.trial import BEST_STATE_FILE, load_trained

    cfg = TrialConfig.model_validate(trial_dict)
    result = run_trial(cfg, checkpoint_dir=tmp_path)
    model, splits, _ = load_trained(cfg, tmp_path / BEST_STATE_FILE)
    x = torch.stack([splits.test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))


def test_saved_state_is_what_state_dict_holds(tmp_path):
    """Swin's non-persistent buffers (relative_position_index, attn_mask) are neither saved nor expected back."""
    from tests.test_methods import SWIN
    from roli_sweep.models.backbone import build_backbone
    from roli_sweep.models.methods import apply_method
    from roli_sweep.core.stage import load_state, state_of

    model = build_backbone(SWIN, num_classes=3)
    apply_method(model, "lora", {"r": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = state_of(model, trainable)
    assert set(state) <= set(model.state_dict()) and trainable <= set(state)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in state)
    assert any("relative_position_index" in n for n, _ in model.named_buffers())
    load_state(model, state, "saved state")
    with pytest.raises(RuntimeError, match="missing"):
        load_state(model, {k: v for k, v in state.items() if "lora_A" not in k}, "saved state")


@pytest.mark.parametrize("stop_after", [0, 1])
def test_a_resumed_trial_repeats_the_uninterrupted_one(tmp_path, trial_dict, stop_after):
    """Interrupted after stage 1 (0) or after finetune epoch 1, then resumed from the checkpoint folder: the
    same epochs and the same metrics as an uninterrupted run with the same seed."""
    trial_dict["finetune"]["epochs"] = 3
    trial_dict["finetune"]["method_params"]["dropout"] = 0.5  # LoRA dropout draws from torch's global RNG
    cfg = TrialConfig.model_validate(trial_dict)
    whole = []
    run_trial(cfg, lambda stage, m: whole.append((stage, dict(m))))

    class Stop(Exception):
        pass

    def stop(stage, metrics):
        if stage == "probe_done" and stop_after == 0 or stage == "finetune" and metrics["epoch"] == stop_after:
            raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, stop, checkpoint_dir=tmp_path / "first")
    resumed = []
    run_trial(cfg, lambda stage, m: resumed.append((stage, dict(m))), checkpoint_dir=tmp_path / "second",
              resume_dir=tmp_path / "first")
    assert [s for s, _ in resumed] == ["finetune"] * (3 - stop_after), "no epoch runs twice, stage 1 not again"
    skip = lambda m: {k: v for k, v in m.items() if k not in ("train_images_per_s", "trial_seconds")}  # noqa: E731
    assert [skip(m) for s, m in resumed] == [skip(m) for s, m in whole if s == "finetune"][stop_after:]


def test_divergence_stops_the_trial_at_once(trial_dict):
    from roli_sweep.core.train import DivergenceError

    trial_dict["finetune"]["lr"] = 1e30  # AdamW moves every parameter by about lr: the loss overflows
    seen = []
    with pytest.raises(DivergenceError, match=r"non-finite (loss|trainable parameters) at finetune epoch 1, step \d+, lr"):
        run_trial(TrialConfig.model_validate(trial_dict), lambda stage, m: seen.append(stage))
    assert "finetune" not in seen


def test_cuda_out_of_memory_names_the_batch_size(trial_dict, monkeypatch):
    """Injected: no GPU is needed to see what the user is told."""
    import roli_sweep.core.stage as stage_module
    from roli_sweep.core.stage import TrialOutOfMemoryError

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stage_module, "adversarial_epoch", out_of_memory)
    with pytest.raises(TrialOutOfMemoryError, match="probe epoch 1 at batch size 32 .*lower them.*bf16"):
        run_trial(TrialConfig.model_validate(trial_dict))
