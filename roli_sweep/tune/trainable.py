"""The Ray Tune side of one trial: a function trainable that saves every epoch and resumes after the last one."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from roli_sweep.config import TrialConfig, apply_overrides
from roli_sweep.tune.epoch_store import EpochStore


def run_tune_trial(config: dict[str, Any], base: TrialConfig, threads: int, state_root: str,
                   probe_cache: str | None = None, trial_fn: Callable[..., Any] | None = None) -> None:
    """One probe-then-finetune trial (:func:`roli_sweep.core.trial.run_trial`) as a Ray Tune function trainable.

    It reports the end of stage 1 (``epoch`` 0) and every finetune epoch, each saved first with the trial's
    checkpoint folder (probe, stage-2 state, and after the last epoch the tested state) in its
    :class:`~roli_sweep.tune.epoch_store.EpochStore` under ``state_root`` (the sweep's ``trial_state`` folder), not as
    a Ray Tune checkpoint (that module says why). A trial restarted by ``Tuner.restore`` finds its saved epoch by its
    trial id, reports it again (the driver may have stopped before it processed it; the MLflow callback, the Optuna
    search and ASHA each take an epoch once) and continues after it with the same numbers (the RNGs are restored
    too). Each probe epoch is reported too, as progress (``stage`` probe, ``probe_epoch``; no ``epoch``, so ASHA and
    the searcher ignore it). With ``probe_cache`` (a folder) stage 1 comes from
    :class:`roli_sweep.core.probe_cache.ProbeCache`.

    ``trial_fn`` replaces :func:`~roli_sweep.core.trial.run_trial` (same arguments, same ``on_epoch`` reports):
    ``benchmarks/driver_scale.py`` passes a trivial trial to time the sweep stack around it. Users never set it.
    """
    import torch

    from roli_sweep.core.probe_cache import ProbeCache
    from roli_sweep.core.trial import run_trial

    torch.set_num_threads(threads)
    cfg = apply_overrides(base, config)
    cache = ProbeCache(Path(probe_cache)) if probe_cache else None
    context = tune.get_context()
    store = EpochStore(Path(state_root), context.get_experiment_name(), context.get_trial_id(), config)
    saved = store.latest()
    if saved is not None:
        tune.report(saved[1])
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "checkpoint"
        folder.mkdir()

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
            if stage == "probe":
                tune.report({"stage": "probe", "probe_epoch": metrics["epoch"], "probe_epochs": cfg.probe.epochs,
                             "probe_epoch_val_robust_acc": metrics["val_robust_acc"]})
                return
            node = {"ray_node": ray.get_runtime_context().get_node_id()} if stage == "probe_done" else {}
            report = {"stage": stage, **metrics, **node}
            store.save(folder, report)
            tune.report(report)

        (trial_fn or run_trial)(cfg, on_epoch=on_epoch, checkpoint_dir=folder,
                                resume_dir=saved[0] if saved else None, probe_cache=cache)
