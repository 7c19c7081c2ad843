"""ASHA per arm: a space with ``arms`` gives each arm its own ASHA brackets, so a trial is compared at a rung only
with trials of its own arm. One ASHA over both would let RoLI's trials, whose head starts trained, stop RanLI's
at the first rungs for where they start rather than where they end. References: Ray Tune ``ASHAScheduler``;
Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020.
"""
from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from roli_sweep.config import SearchSpace
from roli_sweep.names import case_key


def make_asha(space: SearchSpace, metric: str) -> ASHAScheduler:
    """ASHA over finetune epochs (``time_attr`` ``epoch``) with the space's grace period and reduction factor."""
    return ASHAScheduler(time_attr="epoch", metric=metric, mode="max", grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor,
                         max_t=space.scheduler.max_t or space.base.finetune.epochs)


class ArmedScheduler(FIFOScheduler):
    """One :func:`make_asha` per value of ``space.arms``; each trial's events go to its arm's (the arm read from
    the trial's config). Picklable, for ``Tuner.restore``."""

    def __init__(self, space: SearchSpace, metric: str) -> None:
        super().__init__()
        self._metric, self.arms = metric, space.arms
        self.by_arm = {case_key(value): make_asha(space, metric) for value in space.arm_values()}

    def _of(self, trial: Any) -> ASHAScheduler:
        return self.by_arm[case_key(trial.config[self.arms])]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return not (metric or mode)  # each arm's ASHA has its metric and mode

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"arm {arm}: {asha.debug_string()}" for arm, asha in self.by_arm.items())
