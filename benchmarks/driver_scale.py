"""The sweep driver's cost per trial at 100 to 10,000 trials, against the bare Ray Tune stack, by component.

    python benchmarks/driver_scale.py --trials 100 1000 [10000] [--epochs 2] [--space search_spaces/lora.yaml]
        [--dir DIR] [--num-cpus 2] [--max-concurrent 2] [--cpu-per-trial 1] [--limit-s SECONDS]

For each trial count, two sweeps run one after the other, each in its own process with its own local Ray runtime
(``--num-cpus``, default 2) and a fresh SQLite MLflow store, on trivial trials that report at once, so what is timed
is the driver:

- **bare**: Ray Tune ``Tuner`` + ``OptunaSearch`` (Optuna's default TPE, in memory) + ``ASHAScheduler`` +
  ``MLflowLoggerCallback`` on SQLite; the trial reports the space's finetune epochs, no checkpoints.
- **roli_sweep**: :func:`roli_sweep.sweep.run_sweep` on the space (its arms, conditional ranges, ASHA and Optuna
  studies in the sweep's SQLite RDB), then the end tables (:func:`roli_sweep.console.print_sweep_end`), with the
  trial replaced by :func:`trivial_trial` (``run_sweep(trial_fn=...)``, a benchmark hook, not a user option). The
  trivial trial reports what a real one does (probe epochs, end of stage 1 and every finetune epoch each saved first
  with a small checkpoint folder, test accuracies at the last) with accuracies drawn from a smooth function of the sampled
  values, so ASHA prunes and TPE models something. Confirmation and final evaluation are off (``confirm.seeds: 0``,
  ``final_top_k: 0``): they run real models.

The driver-side time of each component is measured by wrapping its entry points (the MLflow child-run callback,
the console callback, the Optuna searches, the ASHA scheduler, the parent run's start and end, the end-of-sweep
analyses, the end tables; in the bare stack its searcher, scheduler and MLflow callback); "Ray Tune and the rest" is
the wall time left (Ray Tune's controller and result handling, its experiment-state snapshots, actor reuse, waiting
on the trials). Trial ends are timestamped, so the cost of the first and the last tenth of the
trials is printed too: flat means they match.

Numbers only, never asserted: they depend on the machine and on what else runs on it; run it alone.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------ the trivial trial


def trial_quality(sampled: dict[str, Any]) -> float:
    """A val robust accuracy in (0, 1) that depends smoothly on the sampled lr (peak at 1.5e-2), a little on the
    rest, and on nothing random: the same config always scores the same."""
    lr = float(sampled.get("finetune.lr", 1e-2))
    digest = hashlib.blake2b(json.dumps(sampled, sort_keys=True, default=str).encode(), digest_size=4).digest()
    noise = int.from_bytes(digest, "little") % 1000 / 1000 * 0.02
    roli = 0.03 if sampled.get("finetune.head_init", "roli") == "roli" else 0.0
    return max(0.01, 0.45 - 0.08 * (math.log10(lr) - math.log10(1.5e-2)) ** 2 + roli + noise)


def trivial_trial(cfg, on_epoch, checkpoint_dir: Path | None = None, resume_dir: Path | None = None,
                  probe_cache=None) -> None:
    """A trial with the reports of :func:`roli_sweep.core.trial.run_trial` and no computation: probe epochs, the end
    of stage 1 (epoch 0), each finetune epoch (accuracy rising to :func:`trial_quality`), a small checkpoint file
    per epoch, test accuracies at the last; resumes after the epoch its checkpoint holds."""
    sampled = {"finetune.lr": cfg.finetune.lr, "finetune.head_init": cfg.finetune.head_init,
               "attack.eps": cfg.attack.eps, "r": cfg.finetune.method_params.get("r")}
    quality = trial_quality(sampled)
    state = Path(checkpoint_dir) / "trivial.json" if checkpoint_dir else None
    done = json.loads((Path(resume_dir) / "trivial.json").read_text())["epoch"] if resume_dir else None
    probe = {"probe_val_clean_acc": quality + 0.2, "probe_val_robust_acc": quality * 0.8}
    if done is None:
        for epoch in range(1, cfg.probe.epochs + 1):
            on_epoch("probe", {"epoch": epoch, "val_robust_acc": quality * 0.8 * epoch / cfg.probe.epochs})
        if state:
            state.write_text(json.dumps({"epoch": 0}))
        on_epoch("probe_done", {"epoch": 0, **probe, "probe": "computed", "probe_key": "trivial", "probe_seconds": 0.0})
    best = {"val_robust_acc": -1.0}
    for epoch in range(1, cfg.finetune.epochs + 1):
        robust = quality * (0.5 + 0.5 * epoch / cfg.finetune.epochs)
        clean = min(1.0, robust + 0.3)
        if robust > best["val_robust_acc"]:
            best = {"best_epoch": epoch, "val_clean_acc": clean, "val_robust_acc": robust}
        if done is not None and epoch <= done:
            continue
        metrics = {"epoch": epoch, "train_loss": 2.0 - robust, "train_robust_acc": robust, "lr": cfg.finetune.lr,
                   "val_clean_acc": clean, "val_robust_acc": robust, "best_val_robust_acc": best["val_robust_acc"],
                   "best_val_clean_acc": best["val_clean_acc"], **probe}
        if state:
            state.write_text(json.dumps({"epoch": epoch}))
        if epoch == cfg.finetune.epochs:
            metrics.update(best_epoch=best["best_epoch"], test_clean_acc=clean, test_robust_acc=robust,
                           trial_seconds=0.0)
        on_epoch("finetune", metrics)


# -------------------------------------------------------------------------------------------------- timing


class Clock:
    """Seconds spent in wrapped functions, by component, and the times trials ended; every ``progress_every`` trial
    ends a ``PROGRESS <trials ended> <seconds since start>`` line on stdout, so a sweep stopped at ``--limit-s`` is
    still reported up to where it got."""

    def __init__(self, progress_every: int = 0) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.ends: list[float] = []
        self.started = time.perf_counter()
        self.progress_every = progress_every

    def trial_ended(self, now: float) -> None:
        self.ends.append(now)
        if self.progress_every and len(self.ends) % self.progress_every == 0:
            print(f"PROGRESS {len(self.ends)} {now - self.started:.2f}", flush=True)

    def wrap(self, owner: Any, name: str, component: str, ends: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                now = time.perf_counter()
                self.seconds[component] += now - start
                if ends:
                    self.trial_ended(now)

        setattr(owner, name, timed)


def tail_rates(ends: list[float], start: float) -> tuple[float, float]:
    """Seconds per trial over the first and the last tenth of the trial ends."""
    ends = sorted(ends)
    tenth = max(1, len(ends) // 10)
    first = (ends[tenth - 1] - start) / tenth
    last = (ends[-1] - ends[-tenth - 1]) / tenth if len(ends) > tenth else first
    return first, last


def space_for(space_path: Path, trials: int, max_concurrent: int, cpu_per_trial: float, epochs: int | None):
    """The space as the benchmark runs it: ``trials`` trials, no confirmation, no final evaluation; with ``epochs``,
    trials of that many finetune epochs and one probe epoch, ASHA's rungs at 1, 2, 4, ... up to ``epochs``."""
    from roli_sweep.config import load_search_space

    space = load_search_space(space_path)
    update = {"num_samples": trials, "max_concurrent": max_concurrent, "final_top_k": 0,
              "confirm": space.confirm.model_copy(update={"seeds": 0}),
              "resources": space.resources.model_copy(update={"cpu": cpu_per_trial})}
    if epochs:
        base = space.base
        update["base"] = base.model_copy(update={"probe": base.probe.model_copy(update={"epochs": 1}),
                                                 "finetune": base.finetune.model_copy(update={"epochs": epochs})})
        update["scheduler"] = space.scheduler.model_copy(update={"grace_period": 1, "reduction_factor": 2,
                                                                 "max_t": epochs})
    return space.model_copy(update=update)


def run_bare(space, folder: Path, num_cpus: int) -> dict:
    """The bare stack on the space's parameters (a conditional range flattened to its widest span)."""
    import optuna
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from roli_sweep.tune.runtime import set_tune_environment, start_local_runtime, stop_local_runtime

    params = {}
    for key, spec in space.parameters.items():
        specs = list(spec.cases.values()) if spec.given else [spec]
        if specs[0].values is not None:
            params[key] = tune.choice(specs[0].values)
        else:
            params[key] = tune.loguniform(min(s.min for s in specs), max(s.max for s in specs))
    epochs = space.base.finetune.epochs
    clock = Clock(progress_every=max(1, space.num_samples // 100))
    for name in ("suggest", "on_trial_result", "on_trial_complete"):
        clock.wrap(OptunaSearch, name, "Optuna study (in memory) and TPE")
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        clock.wrap(MLflowLoggerCallback, name, "MLflowLoggerCallback")
    for name in ("on_trial_add", "on_trial_result", "on_trial_complete", "choose_trial_to_run"):
        clock.wrap(ASHAScheduler, name, "ASHA")

    def bare_trial(config):
        quality = trial_quality(config)
        for epoch in range(1, epochs + 1):
            tune.report({"epoch": epoch, "val_robust_acc": quality * (0.5 + 0.5 * epoch / epochs)})

    class Ends(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            clock.trial_ended(time.perf_counter())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    set_tune_environment()
    started = clock.started = time.perf_counter()
    start_local_runtime(folder, num_cpus)
    runtime = time.perf_counter() - started
    try:
        tuner = tune.Tuner(
            tune.with_resources(bare_trial, {"cpu": space.resources.cpu}), param_space=params,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(OptunaSearch(metric="val_robust_acc", mode="max",
                                                           sampler=optuna.samplers.TPESampler(seed=0)),
                                              max_concurrent=space.max_concurrent),
                scheduler=ASHAScheduler(time_attr="epoch", metric="val_robust_acc", mode="max",
                                        grace_period=space.scheduler.grace_period,
                                        reduction_factor=space.scheduler.reduction_factor, max_t=epochs),
                num_samples=space.num_samples, reuse_actors=True),
            run_config=tune.RunConfig(name="bare", storage_path=str(folder), verbose=0, callbacks=[
                MLflowLoggerCallback(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", experiment_name="bare",
                                     save_artifact=False), Ends()]))
        results = tuner.fit()
        assert len(results) == space.num_samples and not results.errors, results.errors
    finally:
        stopping = time.perf_counter()
        stop_local_runtime(folder)
        runtime += time.perf_counter() - stopping
    wall = time.perf_counter() - started
    first, last = tail_rates(clock.ends, started)
    return {"wall_s": wall, "first_tenth_s": first, "last_tenth_s": last,
            "components": {**clock.seconds, "Ray runtime start and stop": runtime}}


def run_roli(space, space_path: Path, folder: Path, num_cpus: int) -> dict:
    """roli_sweep's stack on the trivial trial, every driver-side component timed."""
    from rich.console import Console

    import roli_sweep.sweep as sweep
    from roli_sweep.console import print_sweep_end
    from roli_sweep.tune.callbacks import ConsoleProgress, MlflowTrialCallback
    from roli_sweep.tune.scheduler import ArmedScheduler
    from roli_sweep.tune.searcher import TruthfulOptunaSearch
    from ray.tune.schedulers import AsyncHyperBandScheduler

    clock = Clock(progress_every=max(1, space.num_samples // 100))
    events = ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error")
    for name in events:
        clock.wrap(MlflowTrialCallback, name, "MLflow child runs")
        clock.wrap(ConsoleProgress, name, "console (progress lines)", ends=name in events[2:])
    clock.wrap(ConsoleProgress, "on_step_end", "console (progress lines)")
    for name in ("suggest", "on_trial_result", "on_trial_complete"):
        clock.wrap(TruthfulOptunaSearch, name, "Optuna studies (RDB) and TPE")
    scheduler = ArmedScheduler if space.arms else AsyncHyperBandScheduler
    for name in ("on_trial_add", "on_trial_result", "on_trial_complete", "choose_trial_to_run"):
        clock.wrap(scheduler, name, "ASHA")
    clock.wrap(sweep, "start_parent_run", "parent run (start)")
    for name in ("start_local_runtime", "stop_local_runtime"):
        clock.wrap(sweep, name, "Ray runtime start and stop")
    for name in ("_rows", "compute_accounting"):
        clock.wrap(sweep, name, "results read back (rows, compute)")
    clock.wrap(sweep, "analyse_sweep", "end-of-sweep analyses")
    clock.wrap(sweep, "log_sweep_end", "parent run (end: findings, tables, plots)")
    started = clock.started = time.perf_counter()
    outcome = sweep.run_sweep(space, space_path, "roli", f"sqlite:///{folder / 'mlflow.db'}", folder,
                              num_cpus=num_cpus, trial_fn=trivial_trial)
    before_tables = time.perf_counter()
    print_sweep_end(Console(file=io.StringIO(), width=160), outcome, space)
    tables = time.perf_counter() - before_tables
    wall = time.perf_counter() - started
    clock.seconds["end tables (console)"] += tables
    assert len(outcome.rows) == space.num_samples, len(outcome.rows)
    failed = [r for r in outcome.rows if r.status == "failed"]
    assert not failed, failed[0].error
    first, last = tail_rates(clock.ends, started)
    return {"wall_s": wall, "first_tenth_s": first, "last_tenth_s": last, "components": dict(clock.seconds),
            "completed": len(outcome.completed())}


# ------------------------------------------------------------------------------------------------ the runs


def one(stack: str, trials: int, space_path: Path, folder: Path, num_cpus: int, max_concurrent: int,
        cpu_per_trial: float, epochs: int | None) -> dict:
    space = space_for(space_path, trials, max_concurrent, cpu_per_trial, epochs)
    folder.mkdir(parents=True, exist_ok=True)
    result = run_bare(space, folder, num_cpus) if stack == "bare" else run_roli(space, space_path, folder, num_cpus)
    return {"stack": stack, "trials": trials, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--space", type=Path, default=REPO / "search_spaces" / "lora.yaml")
    parser.add_argument("--dir", type=Path, help="where the sweeps are written (default: a temporary folder)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--cpu-per-trial", type=float, default=1.0, help="Ray CPUs per trial (both stacks)")
    parser.add_argument("--epochs", type=int, help="finetune epochs per trial, with one probe epoch (default: the "
                                                   "space's own)")
    parser.add_argument("--limit-s", type=float, help="stop a sweep that runs longer than this and report it up to "
                                                      "where it got (default: no limit)")
    parser.add_argument("--stacks", nargs="+", default=["bare", "roli_sweep"], choices=["bare", "roli_sweep"])
    parser.add_argument("--one", choices=["bare", "roli_sweep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one sweep, its result as the last line
        result = one(args.one, args.trials[0], args.space, args.dir, args.num_cpus, args.max_concurrent,
                     args.cpu_per_trial, args.epochs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="driver_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"driver scale: {args.space.name}, {args.num_cpus} CPUs, {args.max_concurrent} trials at once "
          f"({args.cpu_per_trial:g} CPU each), "
          f"{f'{args.epochs} finetune epochs and 1 probe epoch' if args.epochs else 'the space epochs'} per trial, "
          f"{platform.processor() or platform.machine()}; sweeps in {root}", flush=True)
    results = []
    for trials in args.trials:
        for stack in args.stacks:
            folder = root / f"{stack}_{trials}"
            log = root / f"{stack}_{trials}.log"
            command = [sys.executable, __file__, "--one", stack, "--trials", str(trials), "--space", str(args.space),
                       "--dir", str(folder), "--num-cpus", str(args.num_cpus), "--max-concurrent",
                       str(args.max_concurrent), "--cpu-per-trial", str(args.cpu_per_trial),
                       *(["--epochs", str(args.epochs)] if args.epochs else [])]
            code = run_limited(command, log, folder, args.limit_s)
            lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
            if code is None:
                result = {"stack": stack, "trials": trials, "stopped_s": args.limit_s}
            elif code != 0 or not lines:
                print(f"{stack} at {trials} trials failed (exit {code}); log: {log}", flush=True)
                sys.exit(1)
            else:
                result = json.loads(lines[-1][len("RESULT "):])
            result["progress"] = progress(log)
            results.append(result)
            _print(result)
    _summary(results)


def run_limited(command: list[str], log: Path, folder: Path, limit_s: float | None) -> int | None:
    """Run one sweep's process with its output in ``log``; past ``limit_s`` seconds kill it and the Ray runtime it
    started (:func:`roli_sweep.tune.runtime.end_stale_runtime`) and return None, else its exit status."""
    from roli_sweep.tune.runtime import end_stale_runtime

    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            return child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            end_stale_runtime(folder)
            return None


def progress(log: Path) -> list[tuple[int, float]]:
    """The ``PROGRESS`` lines of a sweep's log: (trials ended, seconds since its start)."""
    points = []
    for line in log.read_text().splitlines():
        if line.startswith("PROGRESS "):
            ended, seconds = line.split()[1:]
            points.append((int(ended), float(seconds)))
    return points


def by_tenth(points: list[tuple[int, float]], trials: int) -> list[float]:
    """Seconds per trial in each tenth of ``trials`` reached (from the progress points)."""
    rates, previous = [], (0, 0.0)
    for ended, seconds in points:
        if ended % max(1, trials // 10) == 0:
            rates.append((seconds - previous[1]) / (ended - previous[0]))
            previous = (ended, seconds)
    return rates


def _print(r: dict) -> None:
    n = r["trials"]
    tenths = " ".join(f"{rate:.3f}" for rate in by_tenth(r["progress"], n))
    if "stopped_s" in r:
        ended, seconds = r["progress"][-1] if r["progress"] else (0, 0.0)
        print(f"\n{r['stack']}, {n} trials: STOPPED at the {r['stopped_s']:.0f} s limit with {ended} trials ended "
              f"({seconds / max(ended, 1):.3f} s per trial to there); s per trial by tenth reached: {tenths}",
              flush=True)
        return
    print(f"\n{r['stack']}, {n} trials: {r['wall_s']:.1f} s, {r['wall_s'] / n:.3f} s per trial "
          f"(first tenth {r['first_tenth_s']:.3f}, last tenth {r['last_tenth_s']:.3f}); s per trial by tenth: "
          f"{tenths}", flush=True)
    accounted = sum(r["components"].values())
    for name, seconds in sorted(r["components"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:45s} {seconds / n * 1000:8.1f} ms per trial", flush=True)
    print(f"  {'Ray Tune and the rest':45s} {(r['wall_s'] - accounted) / n * 1000:8.1f} ms per trial", flush=True)


def _summary(results: list[dict]) -> None:
    by = {(r["stack"], r["trials"]): r for r in results}
    print("\ntrials   bare s/trial   roli_sweep s/trial   ratio   (last tenth: bare / roli_sweep)")
    print("(whole wall time over the trials, Ray runtime start and stop included; a stopped sweep: to where it got)")
    for trials in sorted({r["trials"] for r in results}):
        bare, roli = by.get(("bare", trials)), by.get(("roli_sweep", trials))
        if bare and roli:
            b, r = _per_trial(bare), _per_trial(roli)
            print(f"{trials:6d}   {b[0]:12.3f}   {r[0]:18.3f}   {r[0] / b[0]:5.2f}   ({b[1]:.3f} / {r[1]:.3f})"
                  + ("   (stopped: " + ", ".join(x["stack"] for x in (bare, roli) if "stopped_s" in x) + ")"
                     if "stopped_s" in bare or "stopped_s" in roli else ""))


def _per_trial(r: dict) -> tuple[float, float]:
    """(seconds per trial, seconds per trial over the last tenth reached) of one sweep, whole or stopped."""
    if "stopped_s" not in r:
        return r["wall_s"] / r["trials"], r["last_tenth_s"]
    ended, seconds = r["progress"][-1] if r["progress"] else (1, float("nan"))
    tenths = by_tenth(r["progress"], r["trials"])
    return seconds / ended, tenths[-1] if tenths else float("nan")


if __name__ == "__main__":
    main()
