"""roli_sweep: sweep-driven hyperparameter studies for adversarial transfer learning.

A trial is one RoLI job (Hua et al., "Initialization Matters for Adversarial Transfer Learning",
CVPR 2024): adversarial linear probing of a frozen robust backbone, then adversarial finetuning
with the head initialised from the probe (RoLI) or at random (RanLI). Studies run on Ray Tune with
Optuna sampling and ASHA pruning, recorded in MLflow.
"""
from __future__ import annotations

from typing import Any

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
_HOMES = {"TrialResult": "roli_sweep.core.trial", "run_trial": "roli_sweep.core.trial"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: ``import roli_sweep`` alone loads neither torch nor Ray,
    so commands that need neither (``export``) start in about a second."""
    if name not in __all__:
        raise AttributeError(f"module 'roli_sweep' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES.get(name, "roli_sweep.config")), name)
