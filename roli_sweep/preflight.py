"""Checks of a job's input files before anything starts (no Ray runtime, no MLflow run, no trial).

Every dataset a job reads must have its files under its root (or cache), and every weights file must
be readable and valid: a problem found later would fail every trial the same way, after minutes of
scheduling.
"""
from __future__ import annotations

from roli_sweep.config import ConfigError, TrialConfig


def check_inputs(configs: list[TrialConfig]) -> None:
    """Check the dataset files and the weights file of each distinct data / backbone setting in ``configs``.

    Raises:
        ConfigError: naming the key (``data.root``, ``data.split_dir``, ``backbone.weights``), the path and
            what was found there: missing, truncated, not a safetensors file, not a torch checkpoint, or a
            pickle with objects other than tensors.
    """
    from roli_sweep.data import check_files
    from roli_sweep.models.backbone import check_weights_file, resolve_weights

    problems: list[str] = []
    for data in {c.data.model_dump_json(): c.data for c in configs}.values():
        try:
            check_files(data)
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
    for weights in sorted({c.backbone.weights for c in configs if c.backbone.weights}):
        try:
            check_weights_file(resolve_weights(weights))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
