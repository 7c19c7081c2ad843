"""The Ray Tune side of one trial: a function trainable that checkpoints every epoch and resumes from the last
one."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from roli_sweep.config import TrialConfig, apply_overrides


def run_tune_trial(config: dict[str, Any], base: TrialConfig, threads: int, probe_cache: str | None = None) -> None:
    """One probe-then-finetune trial (:func:`roli_sweep.core.trial.run_trial`) as a Ray Tune function trainable.

    It reports the end of stage 1 (``epoch`` 0, with the probe as checkpoint) and every finetune epoch
    (with the trial's checkpoint: probe, stage-2 state, and after the last epoch the tested state). A
    trial restored by ``Tuner.restore`` gets its last registered checkpoint from ``tune.get_checkpoint()``
    and continues after that epoch. Ray Tune registers a checkpoint when the driver processes its
    result, so after Ctrl+C the epoch whose result was still in flight runs again, with the same
    numbers (the RNGs are restored too); the MLflow callback logs it once. Each probe epoch is reported too,
    as progress (``stage`` probe, ``probe_epoch``; no ``epoch``, so ASHA and the searcher ignore it). With
    ``probe_cache`` (a folder) stage 1 comes from :class:`roli_sweep.core.probe_cache.ProbeCache`.
    """
    import torch

    from roli_sweep.core.probe_cache import ProbeCache
    from roli_sweep.core.trial import run_trial

    torch.set_num_threads(threads)
    cfg = apply_overrides(base, config)
    cache = ProbeCache(Path(probe_cache)) if probe_cache else None
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "checkpoint"
        folder.mkdir()
        resume, checkpoint = None, tune.get_checkpoint()
        if checkpoint is not None:
            resume = Path(work) / "resume"
            with checkpoint.as_directory() as restored:  # may be the storage folder itself: copy, never write
                shutil.copytree(restored, resume)

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
            if stage == "probe":
                tune.report({"stage": "probe", "probe_epoch": metrics["epoch"], "probe_epochs": cfg.probe.epochs,
                             "probe_epoch_val_robust_acc": metrics["val_robust_acc"]})
            else:  # tune.report copies the folder before it returns
                node = {"ray_node": ray.get_runtime_context().get_node_id()} if stage == "probe_done" else {}
                tune.report({"stage": stage, **metrics, **node}, checkpoint=tune.Checkpoint.from_directory(folder))

        run_trial(cfg, on_epoch=on_epoch, checkpoint_dir=folder, resume_dir=resume, probe_cache=cache)
