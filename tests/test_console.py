"""The sweep's progress lines, the registries, the lr schedule and the sampling domains: small units, no Ray runtime."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roli_sweep.console import ProgressLines
from roli_sweep.records import ThreatModel, eps_fraction


def _feed(view: ProgressLines) -> None:
    view.started("t1", {"finetune.lr": 0.001234, "finetune.head_init": "roli"})
    view.progress("t1", {"stage": "probe", "probe_epoch": 1, "probe_epochs": 2, "probe_epoch_val_robust_acc": 0.2})
    view.progress("t1", {"stage": "probe_done", "probe": "cached", "probe_val_robust_acc": 0.25, "epoch": 0})
    view.progress("t1", {"stage": "finetune", "epoch": 3, "val_clean_acc": 0.61, "val_robust_acc": 0.42})


def test_every_event_is_one_line_with_the_elapsed_time_and_an_estimate_at_each_trial_end(capsys):
    view = ProgressLines(2, ["finetune.lr"], 2, 6)
    _feed(view)
    view.finished("t1", "failed", "DivergenceError: non-finite loss at finetune epoch 3, step 2, lr 10")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("[0 s] ") for line in lines)
    assert lines[0].endswith("trial t1 started: lr 0.00123")
    assert lines[1].endswith("trial t1: probe epoch 1/2, val robust 0.200")
    assert lines[2].endswith("trial t1: stage-1 probe cached, val robust 0.250")
    assert lines[3].endswith("trial t1: finetune epoch 3/6, val clean 0.610, robust 0.420")
    assert "trial t1 failed: DivergenceError: non-finite loss at finetune epoch 3, step 2, lr 10; 1/2 trials finished, " \
           "about " in lines[4] and lines[4].endswith("of trials left (estimate)")
    assert view.estimate_left() is not None


EVENTS = st.lists(st.tuples(st.sampled_from(["started", "probe", "probe_done", "epoch", "finished"]),
                            st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 6),
                            st.sampled_from(["completed", "pruned", "failed"])), max_size=40)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_the_running_counts_match_a_count_over_every_trial(events):
    """The finished count and the estimate's epoch sums are kept per event (a sweep's 10,000th trial costs what its
    first did); after any events they equal a count over every trial's line."""
    view = ProgressLines(6, ["finetune.lr"], 2, 6, start=0.0)
    view._say = lambda text: None
    for kind, trial, k, status in events:
        if kind == "started":
            view.started(trial, {"finetune.lr": 0.1})
        elif kind == "probe":
            view.progress(trial, {"stage": "probe", "probe_epoch": min(k, 2), "probe_epoch_val_robust_acc": 0.2})
        elif kind == "probe_done":
            view.progress(trial, {"stage": "probe_done", "probe_val_robust_acc": 0.2, "epoch": 0})
        elif kind == "epoch":
            view.progress(trial, {"stage": "finetune", "epoch": k, "val_clean_acc": 0.5, "val_robust_acc": 0.3})
        else:
            view.finished(trial, status)
        lines = view.lines.values()
        assert view.finished_count() == sum(line.status not in ("running", "pending") for line in lines)
        assert view.epochs_done == sum(line.epochs_done for line in lines)
        assert view.open_epochs_done == sum(line.epochs_done for line in lines if line.status in ("running", "pending"))
        rebuilt = ProgressLines(6, ["finetune.lr"], 2, 6, lines=view.lines, start=0.0)  # the live table's fallback
        assert (rebuilt.by_status, rebuilt.epochs_done) == ({k: v for k, v in view.by_status.items() if v},
                                                             view.epochs_done)


def test_threat_model_is_written_as_the_field_writes_it():
    assert eps_fraction(8 / 255) == "8/255" and eps_fraction(0.1) == "0.1"
    threat = ThreatModel("Linf", 8 / 255, 20, 2.5 * (8 / 255) / 20, 5, "standard", 100, 100, 9, 5000, 100, "1x8x8")
    assert threat.summary() == "L-inf 8/255, PGD-20 ×5 restarts, AutoAttack standard, 100 test images"
    assert ThreatModel.from_params(threat.params()) == threat  # study folders that kept only the params


def test_registries_refuse_a_duplicate_name():
    from roli_sweep.data import register_dataset
    from roli_sweep.models.methods.base import register_method
    from roli_sweep.models.methods.lora import Lora

    with pytest.raises(ValueError, match="'digits' is registered already"):
        register_dataset("digits", check=lambda cfg: 10)(lambda cfg: None)
    with pytest.raises(ValueError, match="'lora' is registered already"):
        register_method(Lora)


def test_warmup_cosine_starts_above_zero_peaks_after_warmup_and_ends_at_zero():
    from roli_sweep.config import StageConfig
    from roli_sweep.core.train import warmup_cosine

    factor = warmup_cosine(StageConfig(epochs=4, lr=0.1, warmup_epochs=1, optimizer="sgd"), steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.1)  # the first step already trains (the reference's first epoch ran at 0)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(39) > 0 and factor(40) == pytest.approx(0.0)
    assert all(factor(i) >= factor(i + 1) for i in range(10, 40))
    assert warmup_cosine(StageConfig(epochs=2, lr=0.1, warmup_epochs=0, optimizer="sgd"), 5)(0) == pytest.approx(1.0)


def test_sampling_distributions_cover_their_ranges():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from roli_sweep.config import ParameterSpec
    from roli_sweep.tune.searcher import distribution

    log = distribution(ParameterSpec(distribution="log_uniform_values", min=1e-4, max=1e-2))
    ints = distribution(ParameterSpec(distribution="int_uniform", min=2, max=4))
    uniform = distribution(ParameterSpec(distribution="uniform", min=0.1, max=0.2))
    choice = distribution(ParameterSpec(values=["roli", "random"]))
    assert isinstance(log, FloatDistribution) and (log.low, log.high, log.log) == (1e-4, 1e-2, True)
    assert isinstance(uniform, FloatDistribution) and not uniform.log
    assert isinstance(choice, CategoricalDistribution) and choice.choices == ("roli", "random")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = {study.ask({"r": ints}).params["r"] for _ in range(100)}
    assert isinstance(ints, IntDistribution) and samples == {2, 3, 4}, "int_uniform includes max"