"""Does the sweep find the best configuration of its space, for less compute than trying a grid of them, and
is the space itself the limit?

Three runs on one Ray runtime, all scored by best val robust accuracy under the space's one evaluation threat
model (the sweep's metric), with the probe cache:
1. the space's sweep as ``run_sweep.py`` runs it (Optuna TPE + ASHA), its final evaluation included (its wall
   time is the README main command's, less starting the CLI); the compute compared is its trials';
2. a grid over the same space: ``--points`` values per numeric range (ends included, log-spaced for log
   ranges) and every categorical value, each a whole trial;
3. the grid one step outside each numeric bound (the grid's own step), every other parameter as in 2.

It prints each one's best and that trial's test clean / robust accuracy, the core-seconds each spent (the
trials' Ray Tune ``time_total_s`` × CPUs per trial: the sweep's ``compute_trials_s``) and their ratio, the
wall time, and whether the winners differ by less than one validation image.

    python benchmarks/search_efficiency.py --space search_spaces/lora.yaml --points 3

Measured numbers only; they go in README by hand with the machine and date.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from grid import GridPoint, best, outside_grids, print_points, run_grid, size, space_grid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from roli_sweep.config import load_search_space  # noqa: E402
from roli_sweep.data import load_splits  # noqa: E402
from roli_sweep.sweep import run_sweep  # noqa: E402
from roli_sweep.tune.runtime import logs_to_file, start_local_runtime, stop_local_runtime  # noqa: E402


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _line(label: str, point: GridPoint | None, core_seconds: float, wall: float) -> str:
    if point is None:
        return f"{label:<22} no completed trial; {core_seconds:.0f} core-s, {wall:.0f} s wall"
    return (f"{label:<22} val robust {point.val_robust_acc:.3f} (val clean {point.val_clean_acc:.3f}) at "
            f"{point.settings}; test clean {point.test_clean_acc:.3f}, test robust {point.test_robust_acc:.3f}; "
            f"{core_seconds:.0f} core-s, {wall:.0f} s wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "lora.yaml")
    parser.add_argument("--points", type=int, default=3, help="grid points per numeric range")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    space = load_search_space(args.space)
    inside, outside = space_grid(space, args.points), outside_grids(space, args.points)
    n_val = len(load_splits(space.base.data, space.base.seed).val)
    print(f"{_cpu_model()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}; space {args.space}", flush=True)
    print(f"sweep: {space.num_samples} trials; grid: {size(inside)} whole trials {inside}; outside: "
          f"{sum(map(size, outside))} whole trials {outside}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        started = time.perf_counter()
        with logs_to_file(out / "search_efficiency.log"):
            start_local_runtime(out, args.num_cpus)
            try:
                clock = time.perf_counter()
                sweep = run_sweep(space, args.space, "sweep", f"sqlite:///{out / 'mlflow.db'}", out,
                                  num_cpus=args.num_cpus)
                sweep_wall = time.perf_counter() - clock
                clock = time.perf_counter()
                grid = run_grid(space, inside, out, "grid", out / "grid_probe_cache")
                grid_wall = time.perf_counter() - clock
                clock = time.perf_counter()
                beyond = [p for i, g in enumerate(outside) for p in run_grid(space, g, out, f"outside{i}",
                                                                                out / "grid_probe_cache")]
                beyond_wall = time.perf_counter() - clock
            finally:
                stop_local_runtime(out)
        total_wall = time.perf_counter() - started
    print("\ngrid:")
    print_points(grid)
    print("\none step outside:")
    print_points(beyond)
    top = sweep.best()
    sweep_best = None if top is None else GridPoint(top.sampled, top.val_robust_acc, top.val_clean_acc,
                                                   top.test_clean_acc, top.test_robust_acc, 0.0)
    sweep_compute = sweep.compute["compute_trials_s"]
    grid_compute = sum(p.core_seconds for p in grid)
    grid_best, beyond_best = best(grid), best(beyond)
    print()
    print(_line("sweep (TPE + ASHA)", sweep_best, sweep_compute, sweep_wall))
    print(_line("grid", grid_best, grid_compute, grid_wall))
    print(_line("one step outside", beyond_best, sum(p.core_seconds for p in beyond), beyond_wall))
    print(f"compute ratio sweep / grid: {sweep_compute / grid_compute:.2f} (target ≤ 0.25)")
    if sweep_best and grid_best:
        gap = grid_best.val_robust_acc - sweep_best.val_robust_acc
        print(f"grid best − sweep best: {gap * 100:+.1f} points of val robust accuracy (target ≤ 1.0); "
              f"one validation image is {100 / n_val:.1f} points ({n_val} images)"
              + ("; they differ by less than one validation image" if abs(gap) * n_val < 1 else ""))
    if beyond_best and (grid_best or sweep_best):
        inner = max(p.val_robust_acc for p in (grid_best, sweep_best) if p)
        print(f"best one step outside − best inside: {(beyond_best.val_robust_acc - inner) * 100:+.1f} points "
              "(target ≤ 2.0)")
    edges = [message for found in sweep.findings for _, message in found.warnings]
    print(f"sweep edge warnings: {edges or 'none'}")
    if top is not None and top.final and "metrics" in top.final:
        final = top.final["metrics"]
        print(f"sweep's final evaluation of its best trial: clean {final['final_clean_acc']:.3f}, PGD "
              f"{final['final_pgd_acc']:.3f}, AutoAttack {final.get('final_autoattack_acc', float('nan')):.3f}; "
              f"{sweep.compute['compute_final_eval_s']:.0f} core-s")
    print(f"benchmark wall time: {total_wall:.0f} s")


if __name__ == "__main__":
    main()
