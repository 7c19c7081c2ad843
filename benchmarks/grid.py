"""Whole trials over a grid of a search space's settings, as a baseline for a sweep and to choose ranges.

Every point is one whole probe-then-finetune trial (no pruning), run by Ray Tune on the sweep's own trainable
(:func:`roli_sweep.tune.trainable.run_tune_trial`) with the probe cache, two at a time on 2 cores. Each point is
scored as a sweep scores it: best val robust accuracy under the space's one evaluation threat model, with the
test clean and robust accuracy of that trial beside it. Compute is the trials' Ray Tune ``time_total_s`` ×
CPUs per trial, the same accounting as a sweep's ``compute_trials_s``.

    python benchmarks/grid.py --space search_spaces/lora.yaml \\
        --values finetune.lr=3e-3,1e-2,3e-2,1e-1 --values finetune.head_init=roli,random \\
        --values finetune.method_params.r=4,8,16

A key not given keeps the space's ``base`` value; ``--points N`` instead spans every parameter of the space
(N points per numeric range, every categorical value; a space with ``arms`` is spanned arm by arm, each
conditional range by its arm's case).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Ray Tune box: progress comes from GridProgress

from ray import tune  # noqa: E402

from roli_sweep.config import ParameterSpec, SearchSpace, load_search_space  # noqa: E402
from roli_sweep.tune.epoch_store import TRIAL_STATE  # noqa: E402
from roli_sweep.tune.trainable import run_tune_trial  # noqa: E402


@dataclass
class GridPoint:
    """One whole trial of a grid: its settings and what it reached."""

    settings: dict[str, Any]
    val_robust_acc: float
    val_clean_acc: float
    test_clean_acc: float
    test_robust_acc: float
    core_seconds: float
    error: str | None = None


def numeric_points(spec: ParameterSpec, points: int) -> list[float]:
    """``points`` values spread evenly over a numeric range, ends included (in log space for log ranges)."""
    if points == 1:
        return [math.sqrt(spec.min * spec.max) if spec.distribution == "log_uniform_values"
                else (spec.min + spec.max) / 2]
    if spec.distribution == "log_uniform_values":
        low, high = math.log10(spec.min), math.log10(spec.max)
        return [float(f"{10 ** (low + (high - low) * i / (points - 1)):.3g}") for i in range(points)]
    values = [spec.min + (spec.max - spec.min) * i / (points - 1) for i in range(points)]
    return [int(round(v)) for v in values] if spec.distribution == "int_uniform" else values


def one_step_outside(spec: ParameterSpec, points: int) -> tuple[float, float]:
    """The values one grid step below ``min`` and above ``max``: the grid's ratio for a log range, its spacing
    for a linear one."""
    if spec.distribution == "log_uniform_values":
        ratio = (spec.max / spec.min) ** (1 / max(points - 1, 1))
        return float(f"{spec.min / ratio:.3g}"), float(f"{spec.max * ratio:.3g}")
    step = (spec.max - spec.min) / max(points - 1, 1)
    return spec.min - step, spec.max + step


def _plain(space: SearchSpace, arm: Any) -> dict[str, ParameterSpec]:
    """The space's parameters within one arm: a conditional one as its case for ``arm``."""
    plain = {}
    for key, spec in space.parameters.items():
        if spec.given is not None and spec.given != space.arms:
            raise SystemExit(f"{key}: a grid spans conditional ranges on the arms only, not on {spec.given}")
        plain[key] = spec.resolve({space.arms: arm}) if spec.given is not None else spec
    return plain


def space_grids(space: SearchSpace, points: int) -> list[tuple[Any, dict[str, list[Any]]]]:
    """Per arm (one ``None`` entry without arms), ``(arm value, grid)``: the arm's own value, every other
    categorical value and ``points`` values per numeric range (a conditional range: the arm's case)."""
    grids = []
    for arm in space.arm_values():
        grid = {key: list(spec.values) if spec.values is not None else numeric_points(spec, points)
                for key, spec in _plain(space, arm).items()}
        if space.arms:
            grid[space.arms] = [arm]
        grids.append((arm, grid))
    return grids


def outside_grids(space: SearchSpace, points: int) -> list[dict[str, list[Any]]]:
    """Per arm and numeric parameter, the arm's grid with that parameter one step outside each bound and the others
    as in :func:`space_grids`."""
    return [grid | {key: list(one_step_outside(spec, points))} for arm, grid in space_grids(space, points)
            for key, spec in _plain(space, arm).items() if spec.values is None]


def size(grid: dict[str, list[Any]]) -> int:
    return math.prod(len(v) for v in grid.values())


class GridProgress(tune.Callback):
    """One line per finished point, so a long grid in the background shows where it is."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.started = label, total, 0, time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        m = trial.last_result or {}
        print(f"  {self.label} {self.done}/{self.total} {trial.config} val robust "
              f"{m.get('best_val_robust_acc', float('nan')):.3f}, {time.perf_counter() - self.started:.0f} s",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)


def run_grid(space: SearchSpace, grid: dict[str, list[Any]], storage: Path, name: str,
             probe_cache: Path) -> list[GridPoint]:
    """Run every point of ``grid`` (``{dotted key: values}``, their product) as a whole trial on the running
    Ray runtime, ``space.max_concurrent`` at a time."""
    threads = max(1, int(space.resources.cpu))
    trainable = tune.with_resources(
        tune.with_parameters(run_tune_trial, base=space.base, threads=threads,
                             state_root=str(storage / TRIAL_STATE), probe_cache=str(probe_cache)),
        {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    tuner = tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(values) for key, values in grid.items()},
        tune_config=tune.TuneConfig(max_concurrent_trials=space.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  callbacks=[GridProgress(name, size(grid))]))
    points = []
    for result in tuner.fit():
        m = result.metrics or {}
        points.append(GridPoint(
            settings={key: result.config[key] for key in grid},
            val_robust_acc=float(m.get("best_val_robust_acc", float("nan"))),
            val_clean_acc=float(m.get("best_val_clean_acc", float("nan"))),
            test_clean_acc=float(m.get("test_clean_acc", float("nan"))),
            test_robust_acc=float(m.get("test_robust_acc", float("nan"))),
            core_seconds=float(m.get("time_total_s", 0.0)) * max(space.resources.cpu, 1),
            error=str(result.error).splitlines()[0] if result.error else None))
    return points


def best(points: list[GridPoint]) -> GridPoint | None:
    scored = [p for p in points if p.error is None and math.isfinite(p.val_robust_acc)]
    return max(scored, key=lambda p: p.val_robust_acc) if scored else None


def print_points(points: list[GridPoint]) -> None:
    keys = list(points[0].settings) if points else []
    print(" | ".join(keys + ["val clean", "val robust", "test clean", "test robust", "core-s"]))
    for p in sorted(points, key=lambda p: [str(p.settings[k]) for k in keys]):
        cells = [str(p.settings[k]) for k in keys]
        print(" | ".join(cells + [f"{p.val_clean_acc:.3f}", f"{p.val_robust_acc:.3f}", f"{p.test_clean_acc:.3f}",
                                  f"{p.test_robust_acc:.3f}", f"{p.core_seconds:.0f}"])
              + (f"  FAILED: {p.error}" if p.error else ""))


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def main() -> None:
    from roli_sweep.tune.runtime import logs_to_file, start_local_runtime, stop_local_runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, required=True)
    parser.add_argument("--values", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="the values of one dotted key (repeat per key)")
    parser.add_argument("--points", type=int, help="span the space's own parameters, N points per numeric range")
    parser.add_argument("--out", type=Path, default=Path("grid_results"))
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    space = load_search_space(args.space)
    grids = [grid for _, grid in space_grids(space, args.points)] if args.points else [{}]
    for item in args.values:
        key, _, values = item.partition("=")
        for grid in grids:
            grid[key] = [_value(v) for v in values.split(",")]
    if not any(grids):
        parser.error("give --values or --points")
    name = f"grid-{args.space.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"{sum(map(size, grids))} whole trials of {args.space}: {grids}", flush=True)
    started = time.perf_counter()
    with logs_to_file(args.out.resolve() / f"{name}.log"):
        start_local_runtime(args.out.resolve(), args.num_cpus)
        try:
            points = [p for i, grid in enumerate(grids)
                      for p in run_grid(space, grid, args.out.resolve(), f"{name}-{i}", args.out.resolve() / "probe_cache")]
        finally:
            stop_local_runtime(args.out.resolve())
    print_points(points)
    winner = best(points)
    print(f"best: {winner.settings if winner else None}, val robust {winner.val_robust_acc if winner else float('nan'):.3f}; "
          f"{sum(p.core_seconds for p in points):.0f} core-s of trials, {time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
