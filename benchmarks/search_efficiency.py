"""Does the sweep find the best configuration of its space, reliably, for less compute than trying a grid of them?

On one Ray runtime, all scored by best val robust accuracy under the space's one evaluation threat model (the
sweep's metric), with the probe cache:
1. the space's search as ``run_sweep.py`` runs it (Optuna TPE + ASHA; each arm on its own with ``arms``), once per
   sweep seed (``--sweep-seeds``: the sampler's seed; the trials' own seed stays the base's, as in the grid); the
   confirmation and the final evaluation are left out, since neither is part of finding the best;
2. a grid over the same space, arm by arm: ``--points`` values per numeric range (ends included, log-spaced for
   log ranges; a conditional range at its arm's case) and every categorical value, each a whole trial;
3. with ``--outside``, the grid one step outside each numeric bound (the grid's own step).

Per arm and overall it prints, over the sweep seeds, the mean and spread (min to max) of the gap to the grid's
best (val robust, and the test robust accuracy of the trials each picked) and of the compute ratio (the trials'
Ray Tune ``time_total_s`` × CPUs per trial, sweep over grid).

    python benchmarks/search_efficiency.py --space search_spaces/lora.yaml --points 3 --sweep-seeds 0,1,2

Measured numbers only; they go in README by hand with the machine and date. Targets (never asserted): within 1
point of the grid's best on the mean, at no more than a quarter of its compute.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from grid import best, outside_grids, print_points, run_grid, size, space_grids

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from roli_sweep.names import arm_label  # noqa: E402
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


def _spread(values: list[float], scale: float = 100.0, unit: str = " points", fmt: str = "+.1f") -> str:
    """``mean (min to max)`` of ``values`` × ``scale``."""
    if not values:
        return "n/a"
    shown = [v * scale for v in values]
    return f"{statistics.fmean(shown):{fmt}}{unit} ({min(shown):{fmt}} to {max(shown):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "lora.yaml")
    parser.add_argument("--points", type=int, default=3, help="grid points per numeric range")
    parser.add_argument("--sweep-seeds", default="0,1,2", help="the sweeps' sampler seeds, comma-separated")
    parser.add_argument("--outside", action="store_true", help="also run the grid one step outside every bound")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    space = load_search_space(args.space)
    seeds = [int(s) for s in args.sweep_seeds.split(",")]
    grids = space_grids(space, args.points)
    outside = outside_grids(space, args.points) if args.outside else []
    n_val = len(load_splits(space.base.data, space.base.seed).val)
    label = {arm: arm_label(space.arms, arm) for arm, _ in grids}
    print(f"{_cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; space {args.space}", flush=True)
    print(f"sweeps: {len(seeds)} × {space.num_samples} trials (seeds {seeds}); grid: "
          f"{sum(size(g) for _, g in grids)} whole trials {[g for _, g in grids]}", flush=True)
    search_only = space.model_copy(update={"confirm": space.confirm.model_copy(update={"seeds": 0}), "final_top_k": 0})
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        started = time.perf_counter()
        with logs_to_file(out / "search_efficiency.log"):
            start_local_runtime(out, args.num_cpus)
            try:
                sweeps = []
                for seed in seeds:
                    clock = time.perf_counter()
                    sweeps.append(run_sweep(search_only.model_copy(update={"seed": seed}), args.space, f"sweep{seed}",
                                            f"sqlite:///{out / 'mlflow.db'}", out, num_cpus=args.num_cpus))
                    print(f"sweep seed {seed}: {time.perf_counter() - clock:.0f} s wall", flush=True)
                clock = time.perf_counter()
                grid = {arm: run_grid(space, g, out, f"grid{i}", out / "grid_probe_cache")
                        for i, (arm, g) in enumerate(grids)}
                grid_wall = time.perf_counter() - clock
                beyond = [p for i, g in enumerate(outside) for p in run_grid(space, g, out, f"outside{i}",
                                                                                out / "grid_probe_cache")]
            finally:
                stop_local_runtime(out)
        total_wall = time.perf_counter() - started
    for arm, points in grid.items():
        print(f"\ngrid, {label[arm]}:")
        print_points(points)
    if beyond:
        print("\none step outside:")
        print_points(beyond)
    cpu = max(space.resources.cpu, 1)
    groups = [(label[arm], arm) for arm in grid] + ([("overall", None)] if space.arms else [])
    print(f"\none validation image is {100 / n_val:.1f} points ({n_val} images); grid wall {grid_wall:.0f} s")
    for name, arm in groups:
        points = grid[arm] if arm is not None or not space.arms else [p for ps in grid.values() for p in ps]
        grid_best, grid_compute = best(points), sum(p.core_seconds for p in points)
        val_gaps, test_gaps, ratios = [], [], []
        for seed, sweep in zip(seeds, sweeps):
            rows = [r for r in sweep.rows if space.in_arm(r.sampled, arm)]
            done = [r for r in rows if r in sweep.completed()]
            top = max(done, key=lambda r: r.val_robust_acc, default=None)
            if grid_compute > 0:
                ratios.append(sum(r.seconds for r in rows) * cpu / grid_compute)
            if top is not None and grid_best is not None:
                val_gaps.append(grid_best.val_robust_acc - top.val_robust_acc)
                test_gaps.append(grid_best.test_robust_acc - (top.test_robust_acc or 0.0))
            print(f"  {name}, sweep seed {seed}: " + (f"best val robust {top.val_robust_acc:.3f} at {top.sampled}, "
                  f"test robust {top.test_robust_acc:.3f}" if top else "no completed trial"))
        print(f"{name}: grid best val robust {grid_best.val_robust_acc:.3f} at {grid_best.settings} (test robust "
              f"{grid_best.test_robust_acc:.3f}, {grid_compute:.0f} core-s); grid - sweep over {len(seeds)} seeds: "
              f"val {_spread(val_gaps)}, test {_spread(test_gaps)} (target ≤ 1.0 on val); compute ratio "
              f"{_spread(ratios, 1.0, '', '.3f')} (target ≤ 0.25)" if grid_best else f"{name}: no completed grid point")
    print(f"benchmark wall time: {total_wall:.0f} s")


if __name__ == "__main__":
    main()
