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
    trial restored by ``Tuner.restore`` gets its last checkpoint from ``tune.get_checkpoint()`` and
    continues after the last finished epoch.
    """
    import torch

    from roli_sweep.trial import run_trial

    torch.set_num_threads(threads)
    cfg = apply_overrides(TrialConfig.model_validate(base), config)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "checkpoint"
        folder.mkdir()
        resume = _latest_checkpoint(tune.get_checkpoint(), Path(work) / "resume")

        def on_epoch(stage: str, metrics: dict[str, float]) -> None:
            if stage in ("probe_done", "finetune"):  # tune.report copies the folder before it returns
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

        run_trial(cfg, on_epoch=on_epoch, checkpoint_dir=folder, resume_dir=resume)


def _progress(folder: Path) -> int:
    """How far a checkpoint folder got: the last finished finetune epoch, 0 with the probe only, -1 if unreadable."""
    import torch

    from roli_sweep.trial import PROBE_FILE, RESUME_FILE

    try:
        if (folder / RESUME_FILE).is_file():
            return int(torch.load(folder / RESUME_FILE, weights_only=True)["stage"]["epoch"])
        return 0 if (folder / PROBE_FILE).is_file() else -1
    except Exception:  # noqa: BLE001 - a folder cut short by the interruption is not used
        return -1


def _latest_checkpoint(registered: tune.Checkpoint | None, copy_to: Path) -> Path | None:
    """A copy of the most advanced checkpoint of this trial, or None to start afresh.

    Ray Tune hands a restored trial its last *registered* checkpoint. A checkpoint is written to the
    trial folder before ``tune.report`` returns but registered only when the driver processes that
    result, so after Ctrl+C the trial folder can hold a newer, complete one; it is taken instead, so
    no finished epoch is lost. Only the chosen one is copied; the storage folder is never written to.
    """
    best: tuple[int, Path] | None = None
    if registered is not None:
        with registered.as_directory() as restored:  # may be the storage folder itself, or a download
            shutil.copytree(restored, copy_to)
        best = (_progress(copy_to), copy_to)
    trial_dir = tune.get_context().get_trial_dir()
    on_disk = sorted(Path(trial_dir).glob("checkpoint_*")) if trial_dir else []
    for folder in on_disk:
        progress = _progress(folder)
        if progress >= 0 and (best is None or progress > best[0]):
            best = (progress, folder)
    if best is None or best[0] < 0:
        return None
    if best[1] != copy_to:
        shutil.rmtree(copy_to, ignore_errors=True)
        shutil.copytree(best[1], copy_to)
    return copy_to


def run_final_eval(cfg_json: dict[str, Any], checkpoint_dir: str, state_path: str, threads: int) -> dict[str, Any]:
    """Ray task: rebuild a trial's tested model from its checkpoint, then final evaluation and masking checks."""
    import torch

    from roli_sweep.final_eval import evaluate_and_check
    from roli_sweep.trial import BEST_STATE_FILE, load_trained

    torch.set_num_threads(threads)
    cfg = TrialConfig.model_validate(cfg_json)
    model, splits, device = load_trained(cfg, Path(checkpoint_dir) / BEST_STATE_FILE)
    return evaluate_and_check(model, splits.test, cfg, splits.num_classes, device, Path(state_path)).record()
