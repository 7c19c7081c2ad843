"""A study on Ray Tune: Optuna TPE samples, ASHA prunes on validation robust accuracy, MLflow records.

Each Ray Tune trial runs :func:`roli_sweep.core.trial.run_trial` on the search space's base config with
the sampled values filled in, reporting once per finetune epoch with a checkpoint
(:mod:`roli_sweep.tune.trainable`); ASHA's ``time_attr`` is that ``epoch``, so rungs count finetune
epochs (grace period first). Trials that raise or diverge are recorded as failed, with their own
exception, and the sweep goes on. The Optuna study is stored in ``<storage>/<sweep>/optuna.db``.

Ctrl+C stops the trials after their current step (Ray Tune's graceful stop), marks the parent run and
the unfinished child runs KILLED with tag ``status=interrupted``, skips the final evaluation and
returns ``interrupted``; a second Ctrl+C exits at once (status 130). ``resume`` keeps the completed
trials, continues the unfinished ones after their last checkpointed epoch, reuses the parent run and
then runs the final evaluation. References: Ray Tune ``Tuner`` / ``OptunaSearch`` / ``ASHAScheduler``
docs; Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any


import optuna
import ray
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from roli_sweep.analysis import SweepFacts, analyse_sweep
from roli_sweep.config import ParameterSpec, SearchSpace, TrialConfig, apply_overrides
from roli_sweep.console import FinalProgress
from roli_sweep.records import SweepOutcome, TrialRow, TrialState
from roli_sweep.tracking import log_sweep_end, mark_interrupted, start_parent_run, trial_status
from roli_sweep.tune.auth_token import make_token_private
from roli_sweep.tune.callbacks import ConsoleProgress, MlflowTrialCallback
from roli_sweep.tune.failures import failure_reason
from roli_sweep.tune.final_pool import FinalJob, run_final_jobs
from roli_sweep.tune.interrupt import Interruption
from roli_sweep.tune.runtime import logs_to_file, set_tune_environment, start_local_runtime, stop_local_runtime
from roli_sweep.tune.searcher import TruthfulOptunaSearch, seed_study
from roli_sweep.tune.trainable import run_tune_trial
from roli_sweep.widening import save_sweep_space

OPTUNA_DB = "optuna.db"
"""The sweep's Optuna study, in its Ray Tune experiment folder (SQLite RDB storage)."""

PROBE_CACHE = "probe_cache"
"""In the sweep's folder: the stage-1 probes its trials share (:mod:`roli_sweep.core.probe_cache`)."""

LOG_FILE = "sweep.log"
"""In the sweep's folder: what Ray, MLflow and Optuna log (INFO and up), kept off the console."""

def tune_domain(spec: ParameterSpec) -> Any:
    """The Ray Tune sampling domain of one parameter (int_uniform includes ``max``)."""
    if spec.values is not None:
        return tune.choice(spec.values)
    if spec.distribution == "uniform":
        return tune.uniform(spec.min, spec.max)
    if spec.distribution == "log_uniform_values":
        return tune.loguniform(spec.min, spec.max)
    return tune.randint(int(spec.min), int(spec.max) + 1)


def _rows(results: tune.ResultGrid, finetune_epochs: int) -> list[TrialRow]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        status = trial_status(finetune_epochs, metrics.get("epoch"), result.error is not None)
        rows.append(TrialRow(
            trial_id=metrics.get("trial_id") or Path(result.path).name, sampled=config, status=status,
            epochs=int(metrics.get("epoch", 0)), val_clean_acc=metrics.get("best_val_clean_acc"),
            val_robust_acc=metrics.get("best_val_robust_acc"), test_clean_acc=metrics.get("test_clean_acc"),
            test_robust_acc=metrics.get("test_robust_acc"),
            checkpoint=result.checkpoint.path if result.checkpoint and status == TrialState.COMPLETED else None,
            error=failure_reason(result.error) if result.error else None))
    return rows


def run_sweep(
    space: SearchSpace,
    space_path: Path,
    name: str,
    tracking_uri: str,
    storage_path: Path,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: bool = False,
    probe_cache: bool = True,
    seed_from: str | None = None,
) -> SweepOutcome:
    """Run (or resume) the study described by ``space``.

    Args:
        space: the validated search space (``num_samples`` / ``max_concurrent`` already final).
        space_path: the YAML it came from (logged as the parent run's artifact).
        name: sweep name: Ray Tune experiment folder and MLflow parent run name / ``sweep`` tag.
        tracking_uri: MLflow tracking URI (e.g. ``sqlite:///mlflow.db``).
        storage_path: Ray Tune storage folder; the experiment lives in ``storage_path / name``.
        address: join this Ray cluster (``ray.init(address=...)``); None starts a local runtime.
        num_cpus: CPUs for a local runtime (None = all); ignored when joining a cluster.
        resume: continue the interrupted sweep ``name`` (``Tuner.restore``: completed and failed trials kept,
            unfinished ones continued from their last checkpoint).
        probe_cache: share stage 1 between trials with the same probe settings
            (:mod:`roli_sweep.core.probe_cache`, in ``<storage_path>/<name>/probe_cache``).
        seed_from: a finished sweep in ``storage_path`` whose finished trials start this new sweep's Optuna
            study (``space`` widens that sweep's, :mod:`roli_sweep.widening`, checked by the caller).

    Raises:
        FileNotFoundError: ``resume`` asked for but no restorable sweep at ``storage_path / name``.
    """
    set_tune_environment()
    storage_path = storage_path.resolve()
    experiment_dir = storage_path / name
    if resume and not tune.Tuner.can_restore(str(experiment_dir)):
        raise FileNotFoundError(f"no sweep to resume at {experiment_dir}")
    with logs_to_file(experiment_dir / LOG_FILE):
        started = not ray.is_initialized()
        if started and address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            make_token_private(None)
        elif started:  # recorded, so that a killed driver's runtime is ended at the next start
            start_local_runtime(storage_path, num_cpus)
        try:
            return _sweep(space, space_path, name, tracking_uri, storage_path, resume, probe_cache, seed_from)
        finally:
            if started and address:
                ray.shutdown()
            elif started:  # no Ray process of the sweep outlives it
                stop_local_runtime(storage_path)


def _sweep(space: SearchSpace, space_path: Path, name: str, tracking_uri: str, storage_path: Path,
           resume: bool, probe_cache: bool, seed_from: str | None) -> SweepOutcome:
    """:func:`run_sweep` on a running Ray runtime."""
    experiment_dir = storage_path / name
    started = time.perf_counter()
    client = MlflowClient(tracking_uri)
    parent_run_id = start_parent_run(client, space, space_path, name, resume)
    base = space.base  # typed across Ray: each trial validates only its sampled values (apply_overrides)
    threads = max(1, int(space.resources.cpu))
    cache = str(experiment_dir / PROBE_CACHE) if probe_cache else None
    trainable = tune.with_resources(tune.with_parameters(run_tune_trial, base=base, threads=threads, probe_cache=cache),
                                    {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    param_space = {path: tune_domain(spec) for path, spec in space.parameters.items()}
    if resume:
        # completed and failed trials are kept; unfinished ones continue from their last checkpoint
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        save_sweep_space(space, experiment_dir)
        tuner = _new_tuner(space, name, storage_path, trainable, param_space,
                           MlflowTrialCallback(tracking_uri, space.name, parent_run_id, name, base))
        if seed_from:
            seeded = seed_study(optuna.storages.RDBStorage(f"sqlite:///{experiment_dir / OPTUNA_DB}"), name,
                                optuna.storages.RDBStorage(f"sqlite:///{storage_path / seed_from / OPTUNA_DB}"),
                                seed_from, OptunaSearch.convert_search_space(param_space),
                                ["maximize"] * (2 if space.metric.multi_objective else 1))
            client.log_batch(parent_run_id, params=[Param("seeded_from", seed_from),
                                                    Param("seeded_trials", str(seeded))])
    interruption = Interruption()
    try:
        with interruption.during_fit():
            results = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    rows = _rows(results, space.base.finetune.epochs)
    outcome = SweepOutcome(name, rows, parent_run_id, space.name, tracking_uri, storage_path,
                           interrupted=interruption.pressed,
                           experiment_id=client.get_run(parent_run_id).info.experiment_id)
    if outcome.interrupted:
        stopped = mark_interrupted(client, parent_run_id)
        for row in rows:  # not pruned: --resume continues them
            if row.trial_id in stopped:
                row.status = TrialState.INTERRUPTED
        return outcome
    try:
        final_seconds = final_evaluation(outcome, space, experiment_dir, base, threads, FinalProgress())
    except KeyboardInterrupt:  # the per-batch state is kept: --resume continues the evaluation
        mark_interrupted(client, parent_run_id)
        outcome.interrupted = True
        return outcome
    analyse_sweep(outcome, SweepFacts(space.parameters, f"sqlite:///{experiment_dir / OPTUNA_DB}",
                                      space.base.finetune.head_init, space.metric.multi_objective))
    outcome.compute = compute_accounting(results, space, final_seconds, time.perf_counter() - started)
    log_sweep_end(client, outcome)
    return outcome


def _new_tuner(space: SearchSpace, name: str, storage_path: Path, trainable, param_space: dict[str, Any],
               mlflow_callback: MlflowTrialCallback) -> tune.Tuner:
    """A fresh Tuner: the Optuna study stored in ``<storage_path>/<name>/optuna.db``, ASHA, the callbacks, and
    one checkpoint kept per trial (the latest: it resumes the trial, and after the last epoch holds the tested
    state for the final evaluation)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (storage_path / name).mkdir(parents=True, exist_ok=True)  # SQLite does not create folders
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_path / name / OPTUNA_DB}")
    pruned_on = f"best_{space.metric.name}"
    objectives = ["best_val_clean_acc", pruned_on] if space.metric.multi_objective else pruned_on
    modes = ["max", "max"] if space.metric.multi_objective else "max"
    search = ConcurrencyLimiter(
        TruthfulOptunaSearch(metric=objectives, mode=modes, sampler=optuna.samplers.TPESampler(seed=space.seed),
                             storage=storage, study_name=name, finetune_epochs=space.base.finetune.epochs),
        max_concurrent=space.max_concurrent)
    scheduler = ASHAScheduler(time_attr="epoch", metric=pruned_on, mode="max",
                              grace_period=space.scheduler.grace_period,
                              reduction_factor=space.scheduler.reduction_factor,
                              max_t=space.scheduler.max_t or space.base.finetune.epochs)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=space.num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[mlflow_callback, ConsoleProgress(
                                      space.num_samples, list(space.parameters), space.base.probe.epochs,
                                      space.base.finetune.epochs)]),
    )


def compute_accounting(results: tune.ResultGrid, space: SearchSpace, final_seconds: float,
                       wall_seconds: float) -> dict[str, float]:
    """Where a sweep's compute went, in core-seconds (seconds × CPUs per trial): ``compute_trials_s`` (every trial's
    Ray Tune ``time_total_s``), ``compute_probe_saved_s`` (the stage-1 compute cached probes spared),
    ``compute_final_eval_s``, ``wall_s``, and ``idle_fraction``: the share of the runtime's CPU-seconds over
    the sweep's wall time that neither trials nor the final evaluation used."""
    cpu = max(space.resources.cpu, 1)
    trials = saved = 0.0
    for result in results:
        trials += float((result.metrics or {}).get("time_total_s", 0.0)) * cpu
        frame = result.metrics_dataframe
        if frame is not None and "probe" in frame:
            cached = frame[frame["probe"] == "cached"]
            saved += float(cached["probe_seconds"].sum()) * cpu
    capacity = wall_seconds * ray.cluster_resources().get("CPU", cpu)
    busy = trials + final_seconds
    return {"compute_trials_s": trials, "compute_probe_saved_s": saved, "compute_final_eval_s": final_seconds,
            "wall_s": wall_seconds,
            "idle_fraction": max(0.0, 1.0 - busy / capacity) if capacity > 0 and math.isfinite(busy) else 0.0}


def final_evaluation(outcome: SweepOutcome, space: SearchSpace, experiment_dir: Path, base: TrialConfig,
                     threads: int, on_piece=None) -> float:
    """Final evaluation (clean, PGD with restarts, AutoAttack) and masking checks of the top
    ``space.final_top_k`` completed trials by val robust accuracy, their pieces spread over every free CPU or
    GPU (:mod:`roli_sweep.tune.final_pool`, actors with the trials' resources).

    Per-piece progress is kept in ``<experiment_dir>/final_eval/<trial_id>.json``, so a resumed sweep
    continues an interrupted evaluation. A failed evaluation is recorded in the row, not raised.

    Returns:
        The core-seconds (CPU seconds × CPUs per actor) the pieces took.
    """
    ranked = sorted((r for r in outcome.completed() if r.checkpoint), key=lambda r: -r.val_robust_acc)
    jobs = [FinalJob(row.trial_id, apply_overrides(base, row.sampled), row.checkpoint,
                     experiment_dir / "final_eval" / f"{row.trial_id}.json") for row in ranked[:space.final_top_k]]
    results = run_final_jobs(jobs, space.resources.cpu, space.resources.gpu, threads, on_piece)
    for row in ranked[:space.final_top_k]:
        row.final = results[row.trial_id].record
    return sum(r.busy_seconds for r in results.values()) * max(space.resources.cpu, 1)
