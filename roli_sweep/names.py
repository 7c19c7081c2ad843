"""The one rule for the names a user gives: sweep, study and experiment names, ``--seed-from``.

A name becomes a folder (``<storage>/<sweep>/``, ``<out>/<study>/``), a file name (exported configs), an
MLflow experiment or tag value inside a filter string, and a word of the commands the tool prints. So it
must be one safe path component and one shell word as it stands: ASCII letters, digits, ``_``, ``.`` and
``-``, starting with a letter or digit, at most :data:`MAX_LENGTH` characters. ``..`` and ``/`` can
never appear as a component, and no quote can change an MLflow query.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import yaml

MAX_LENGTH = 100
"""Longest name allowed: well inside a file name's 255 bytes once a sweep adds ``-rank3-<trial id>.yaml``."""

NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_LENGTH - 1}}}")
ALLOWED = f"1 to {MAX_LENGTH} ASCII letters, digits, '_', '.' or '-', starting with a letter or digit"


def name_problem(value: object) -> str | None:
    """Why ``value`` is not an allowed name, or None when it is."""
    if not isinstance(value, str):
        return f"a name is a string, got {type(value).__name__}"
    if NAME_PATTERN.fullmatch(value) is None:
        return f"not allowed: {ALLOWED}"
    return None


def check_name(value: str, key: str) -> str:
    """``value`` when it is an allowed name.

    Raises:
        ValueError: naming ``key``, the value (bounded) and what is allowed.
    """
    problem = name_problem(value)
    if problem:
        shown = value[:60] + f"... ({len(value)} characters)" if isinstance(value, str) and len(value) > 60 else value
        raise ValueError(f"{key}: value {shown!r} {problem}")
    return value


def default_sweep_name(space_name: str) -> str:
    """``<space name>-<YYYYmmdd-HHMMSS>``, the space's name cut so that the whole stays an allowed name."""
    return f"{space_name[:MAX_LENGTH - 16]}-{datetime.now():%Y%m%d-%H%M%S}"


def case_key(value: Any) -> str:
    """How a categorical value names a case of a conditional parameter or an arm: as YAML writes it (``roli``,
    ``8``, ``true``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def study_name(sweep: str, arm: Any = None) -> str:
    """The Optuna study of a sweep, or of one of its arms: ``<sweep>.<arm>`` (:func:`case_key`)."""
    return sweep if arm is None else f"{sweep}.{case_key(arm)}"


ARM_NAMES = {("finetune.head_init", "roli"): "RoLI", ("finetune.head_init", "random"): "RanLI"}


def arm_label(arms: str | None, value: Any) -> str:
    """How an arm is named to the user: RoLI / RanLI for ``finetune.head_init``, else ``<parameter>=<value>``."""
    if arms is None:
        return "all trials"
    return ARM_NAMES.get((arms, case_key(value)), f"{arms.split('.')[-1]}={case_key(value)}")


def config_fingerprint(config: dict[str, Any]) -> str:
    """A trial's sampled config as one string (keys sorted): finds the tags planned for a confirmation run and tells
    whether a trial's saved epoch (:mod:`roli_sweep.tune.epoch_store`) is of the same config."""
    return json.dumps(config, sort_keys=True, default=str)
