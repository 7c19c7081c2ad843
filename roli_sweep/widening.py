"""Continue a sweep's search on a widened space: what may change between a sweep's space and the next one.

A sweep keeps the space it started with in ``<storage>/<sweep>/search_space.yaml``. A range-edge warning
(:mod:`roli_sweep.edges`) asks for a wider range; the finished trials stay useful as long as they are points
of the new space. So the new space may differ only by

- a numeric range that is the same or wider (``min`` not larger, ``max`` not smaller, same distribution);
- a categorical parameter with the same values and perhaps more;
- a conditional parameter with the same ``given`` whose cases each change only that way (and a case for each
  value its ``given`` gained);
- how much to run: ``num_samples``, ``max_concurrent``, ``resources`` and the confirmation (``confirm``);

and anything else (the base trial config, the metric, the scheduler, the sampler's seed, a parameter added or
removed) is refused, naming the key. Ray Tune restores a sweep with the search algorithm it pickled, space and
sample count included, and offers no public way to change either (``Tuner.restore``: "changing the structure
of the param_space is not supported"), so a widened space is searched by a new sweep whose Optuna study starts
with the old one's finished trials (``--seed-from``, :func:`roli_sweep.tune.searcher.seed_study`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from roli_sweep.config import ConfigError, ParameterSpec, SearchSpace, dump_yaml, load_search_space

SPACE_FILE = "search_space.yaml"
"""The resolved space a sweep started with, in its folder."""

RUN_SIZE_KEYS = ("num_samples", "max_concurrent", "resources", "confirm")
"""How much to run, not what is measured: free to change between a sweep and the one it seeds."""


def save_sweep_space(space: SearchSpace, sweep_dir: Path) -> None:
    """Write ``space`` (resolved) to ``sweep_dir / SPACE_FILE``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SPACE_FILE).write_text(dump_yaml(space))


def load_sweep_space(sweep_dir: Path) -> SearchSpace:
    """The space the sweep in ``sweep_dir`` started with.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no ``search_space.yaml`` (not a roli_sweep sweep folder).
    """
    path = sweep_dir / SPACE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {sweep_dir} is not the folder of a roli_sweep sweep "
                                "(check --storage-path and the sweep's name)")
    return load_search_space(path)


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in sorted(set(old) | set(new)):
            found = _first_difference(old.get(sub), new.get(sub), f"{key}.{sub}" if key else sub)
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def _parameter_change(key: str, old: ParameterSpec, new: ParameterSpec) -> bool:
    """Whether ``new`` widens ``old`` (False when equal).

    Raises:
        ConfigError: ``new`` narrows ``old`` or changes its kind or distribution.
    """
    where = f"parameters.{key}"
    if old.given is not None or new.given is not None:
        if old.given != new.given:
            raise ConfigError(f"key '{where}.given': {old.given!r} in the finished sweep, {new.given!r} now; a "
                              "conditional parameter keeps the parameter it depends on")
        missing = [case for case in old.cases if case not in new.cases]
        if missing:
            raise ConfigError(f"key '{where}.cases': {missing} removed; the finished trials sampled them")
        changed = [_parameter_change(f"{key}.cases.{case}", spec, new.cases[case]) for case, spec in old.cases.items()]
        return any(changed) or len(new.cases) > len(old.cases)
    if (old.values is None) != (new.values is None) or old.distribution != new.distribution:
        raise ConfigError(f"key {where!r}: changed from {old.model_dump(exclude_none=True)} to "
                          f"{new.model_dump(exclude_none=True)}; only wider bounds or added values are allowed")
    if old.values is not None:
        removed = [v for v in old.values if v not in new.values]
        if removed:
            raise ConfigError(f"key {where}.values: {removed} removed; the finished trials sampled them, "
                              "so values may only be added")
        return len(new.values) > len(old.values)
    if new.min > old.min:
        raise ConfigError(f"key {where}.min: {new.min:g} is above the finished sweep's {old.min:g}; "
                          "a range may only be widened")
    if new.max < old.max:
        raise ConfigError(f"key {where}.max: {new.max:g} is below the finished sweep's {old.max:g}; "
                          "a range may only be widened")
    return (new.min, new.max) != (old.min, old.max)


def widened_parameters(old: SearchSpace, new: SearchSpace) -> list[str]:
    """The parameters ``new`` widens, after checking that it changes nothing else of ``old``.

    Raises:
        ConfigError: naming the first key that differs in another way, with both values.
    """
    skip = {"parameters", *RUN_SIZE_KEYS}
    found = _first_difference({k: v for k, v in old.model_dump(mode="json").items() if k not in skip},
                              {k: v for k, v in new.model_dump(mode="json").items() if k not in skip}, "")
    if found:
        key, was, now = found
        raise ConfigError(f"key {key!r}: {was!r} in the finished sweep, {now!r} now; only parameter bounds, "
                          f"added categorical values and {', '.join(RUN_SIZE_KEYS)} may change")
    for key in sorted(set(old.parameters) ^ set(new.parameters)):
        state = "added" if key in new.parameters else "removed"
        raise ConfigError(f"key 'parameters.{key}': {state}; the finished trials did not sample it the same way, "
                          "so only its bounds or values may change")
    return [key for key in new.parameters if _parameter_change(key, old.parameters[key], new.parameters[key])]
