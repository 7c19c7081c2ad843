"""The Ray Tune side of one trial: a function trainable that checkpoints every epoch and resumes from the last
one, and the Ray task of the final evaluation that rebuilds a trial's tested model from its checkpoint."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from roli_sweep.config import TrialConfig, apply_overrides


def run_tune_trial(config: dict[str, Any], base: dict[str, Any], threads: int) -> None:
    """One probe-then-finetune trial (:func:`roli_sweep.trial.run_trial`) as a Ray Tune function trainable.

    It reports the end of stage 1 (``epoch`` 0, with the probe as checkpoint) and every finetune epoch
    (with the trial's checkpoint: probe, stage-2 state, and after the last epoch the tested state). A
    trial restored by ``Tuner.restore`` gets its last registered checkpoint from ``tune.get_checkpoint()``
    and continues after that epoch. Ray Tune registers a checkpoint when the driver processes its
    result, so after Ctrl+C the epoch whose result was still in flight runs again, with the same
    numbers (the RNGs are restored too); the MLflow callback logs it once.
    """
    import torch

    from roli_sweep.trial import run_trial

    torch.set_num_threads(threads)
    cfg = apply_overrides(TrialConfig.model_validate(base), config)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "checkpoint"
        folder.mkdir()
        resume, checkpoint = None, tune.get_checkpoint()
        if checkpoint is not None:
            resume = Path(work) / "resume"
            with checkpoint.as_directory() as restored:  # may be the storage folder itself: copy, never write
                shutil.copytree(restored, resume)

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
            if stage in ("probe_done", "finetune"):  # tune.report copies the folder before it returns
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

        run_trial(cfg, on_epoch=on_epoch, checkpoint_dir=folder, resume_dir=resume)


def run_final_eval(cfg_json: dict[str, Any], checkpoint_dir: str, state_path: str, threads: int) -> dict[str, Any]:
    """Ray task: rebuild a trial's tested model from its checkpoint, then final evaluation and masking checks."""
    import torch

    from roli_sweep.final_eval import evaluate_and_check
    from roli_sweep.trial import BEST_STATE_FILE, load_trained

    torch.set_num_threads(threads)
    cfg = TrialConfig.model_validate(cfg_json)
    model, splits, device = load_trained(cfg, Path(checkpoint_dir) / BEST_STATE_FILE)
    return evaluate_and_check(model, splits.test, cfg, splits.num_classes, device, Path(state_path)).record()
