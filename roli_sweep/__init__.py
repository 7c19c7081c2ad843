"""roli_sweep: sweep-driven hyperparameter studies for adversarial transfer learning.

A trial is one RoLI job (Hua et al., "Initialization Matters for Adversarial Transfer Learning",
CVPR 2024): adversarial linear probing of a frozen robust backbone, then adversarial finetuning
with the head initialised from the probe (RoLI) or at random (RanLI). Studies run on Ray Tune with
Optuna sampling and ASHA pruning, recorded in MLflow.
"""
from roli_sweep.config import (
    ConfigError,
    SearchSpace,
    TrialConfig,
    apply_overrides,
    load_search_space,
    load_trial_config,
)
from roli_sweep.trial import TrialResult, run_trial

__all__ = [
    "ConfigError",
    "SearchSpace",
    "TrialConfig",
    "TrialResult",
    "apply_overrides",
    "load_search_space",
    "load_trial_config",
    "run_trial",
]
