"""Range-edge warnings: the best trials of a sweep sit at a fence of the search space, so the space, not the
search, may be what limits the result.

For each numeric parameter, the best completed trials (the top 3, or the top 20 % when more completed) are
placed in the parameter's range, in log space for ``log_uniform_values``. When the best trial and most of
them lie in the outer tenth at one end, the warning names the parameter, its range, their values, the bound to
move and a new one: one decade further for a log range, one range width for a linear one. An ordered
categorical (numbers only, e.g. ``r: [4, 8, 16]``) warns when all of them take its largest or smallest value.
(scikit-learn issue 16398 asks the same of ``RidgeCV``'s regularisation grid.) A grid search (the study's lr grid
per cell) warns when its winner is the grid's largest or smallest value (:func:`grid_end_warning`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from roli_sweep.config import ParameterSpec
from roli_sweep.records import EdgeWarning

OUTER = 0.1
"""The outer tenth of a range, at either end."""


def top_trials(scored: Sequence[tuple[dict[str, Any], float]]) -> list[dict[str, Any]]:
    """The sampled values of the best completed trials: the top 3, or the top 20 % when that is more."""
    ranked = sorted(scored, key=lambda item: -item[1])
    k = max(3, math.ceil(0.2 * len(ranked)))
    return [values for values, _ in ranked[:k]]


def _position(value: float, spec: ParameterSpec) -> float:
    if spec.distribution == "log_uniform_values":
        return (math.log(value) - math.log(spec.min)) / (math.log(spec.max) - math.log(spec.min))
    return (value - spec.min) / (spec.max - spec.min)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def edge_warnings(parameters: dict[str, ParameterSpec], scored: Sequence[tuple[dict[str, Any], float]],
                  where: str = "") -> list[EdgeWarning]:
    """The warnings for a sweep's completed trials, ``(sampled values, best val robust accuracy)`` each, against
    plain ``parameters`` (a conditional one is checked case by case, with ``where`` naming the case or the arm:
    ``"RoLI's "``, which starts each message).

    Nothing is said with fewer than 3 completed trials.
    """
    if len(scored) < 3:
        return []
    best = top_trials(scored)
    warnings = []
    for name, spec in parameters.items():
        values = [t[name] for t in best if name in t]
        if len(values) < len(best):
            continue
        if spec.values is not None:
            ordered = sorted({v for v in spec.values}, key=float) if all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec.values) else None
            if ordered is None or len(ordered) < 2:
                continue
            for bound, end in (("max", ordered[-1]), ("min", ordered[0])):
                if all(v == end for v in values):
                    warnings.append(EdgeWarning(name, bound, (
                        f"{where}{name}: the best {len(values)} completed trials all take its {'largest' if bound == 'max' else 'smallest'} "
                        f"value {_fmt(end)} (values {ordered}); add a {'larger' if bound == 'max' else 'smaller'} one")))
            continue
        positions = [_position(float(v), spec) for v in values]
        for bound, at_edge in (("max", lambda p: p >= 1 - OUTER), ("min", lambda p: p <= OUTER)):
            if at_edge(positions[0]) and sum(map(at_edge, positions)) * 2 > len(positions):
                log = spec.distribution == "log_uniform_values"
                width = spec.max - spec.min
                new = ((spec.max * 10 if log else spec.max + width) if bound == "max"
                       else (spec.min / 10 if log else spec.min - width))
                if spec.distribution == "int_uniform":
                    new = int(round(new))
                warnings.append(EdgeWarning(name, bound, (
                    f"{where}{name}: range [{_fmt(spec.min)}, {_fmt(spec.max)}]"
                    f"{' (log)' if log else ''}: the best trials ran at {', '.join(_fmt(float(v)) for v in values)}, "
                    f"{sum(map(at_edge, positions))} of {len(values)} in the outer tenth at its {bound}; move {bound} "
                    f"to {_fmt(new)}")))
    return warnings


def grid_end_warning(parameter: str, grid: Sequence[float], best: float, where: str) -> EdgeWarning | None:
    """The warning for a grid search whose winner is the grid's largest or smallest value (the study's lr grids),
    None when it lies inside or the grid has fewer than 3 values. The suggested value is one more grid step:
    the ratio of the two outermost values for a grid of positive values, their difference otherwise."""
    ordered = sorted(grid)
    if len(ordered) < 3 or ordered[0] < best < ordered[-1]:
        return None
    bound, end, next_in = ("max", ordered[-1], ordered[-2]) if best == ordered[-1] else ("min", ordered[0], ordered[1])
    step = end / next_in if end > 0 and next_in > 0 else None
    suggested = end * step if step else end + (end - next_in)
    return EdgeWarning(parameter, bound, (
        f"{where}: {parameter} {_fmt(float(best))} won, the {'largest' if bound == 'max' else 'smallest'} of its grid "
        f"{[_fmt(float(v)) for v in ordered]}; add {_fmt(float(suggested))}"))
