"""A study on Ray Tune: Optuna TPE samples, ASHA prunes on validation robust accuracy, MLflow records.

Each Ray Tune trial runs :func:`roli_sweep.core.trial.run_trial` on the search space's base config with
the sampled values filled in, reporting once per finetune epoch, each epoch saved first
(:mod:`roli_sweep.tune.trainable`, :mod:`roli_sweep.tune.epoch_store`); ASHA's ``time_attr`` is that ``epoch``, so rungs count finetune
epochs (grace period first). Trials that raise or diverge are recorded as failed, with their own
exception, and the sweep goes on. The Optuna study is stored in ``<storage>/<sweep>/optuna.db`` (SQLite), or in the
database ``study_storage`` names (PostgreSQL on a cluster: README, "On a cluster"). A space with
``arms`` searches each arm in its own study with its own ASHA brackets and an equal share of the trials
(:class:`~roli_sweep.tune.searcher.ArmedSearch`, :class:`~roli_sweep.tune.scheduler.ArmedScheduler`).

After the search, each arm's best ``confirm.top_k`` completed trials are rerun as whole trials over the seeds
``base.seed + 1 .. base.seed + confirm.seeds`` (the confirmation: a second Ray Tune experiment in
``<storage>/<sweep>/confirmation``, child runs tagged ``sweep_role=confirmation``), and the arms are compared seed
by seed (:mod:`roli_sweep.comparison`); then each arm's best ``final_top_k`` get the final evaluation.

Ctrl+C stops the trials after their current step (Ray Tune's graceful stop), marks the parent run and
the unfinished child runs KILLED with tag ``status=interrupted``, skips the final evaluation and
returns ``interrupted``; a second Ctrl+C exits at once (status 130). ``resume`` keeps the completed
trials, continues the unfinished ones after their last saved epoch, reuses the parent run and
then runs the final evaluation. References: Ray Tune ``Tuner`` / ``OptunaSearch`` / ``ASHAScheduler``
docs; Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable


import optuna
import ray
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from roli_sweep.analysis import SweepFacts, analyse_sweep
from roli_sweep.names import arm_label, case_key, config_fingerprint, study_name
from roli_sweep.config import SearchSpace, TrialConfig, apply_overrides
from roli_sweep.console import FinalProgress
from roli_sweep.records import SweepOutcome, TrialRow, TrialState
from roli_sweep.tracking import log_sweep_end, mark_interrupted, start_parent_run, trial_status
from roli_sweep.tune.auth_token import make_token_private
from roli_sweep.tune.callbacks import ConsoleProgress, MlflowTrialCallback
from roli_sweep.tune.epoch_store import TRIAL_STATE, EpochStore
from roli_sweep.tune.failures import failure_reason
from roli_sweep.tune.final_pool import FinalJob, run_final_jobs
from roli_sweep.tune.interrupt import Interruption
from roli_sweep.tune.runtime import logs_to_file, set_tune_environment, start_local_runtime, stop_local_runtime
from roli_sweep.tune.scheduler import ArmedScheduler, make_asha
from roli_sweep.tune.searcher import ArmedSearch, DefineByRun, TruthfulOptunaSearch, make_sampler, seed_study
from roli_sweep.tune.trainable import run_tune_trial
from roli_sweep.widening import save_sweep_space

OPTUNA_DB = "optuna.db"
"""The sweep's Optuna study, in its Ray Tune experiment folder (SQLite RDB storage), unless ``study_storage`` is given."""

PROBE_CACHE = "probe_cache"
"""In the sweep's folder: the stage-1 probes its trials share (:mod:`roli_sweep.core.probe_cache`)."""

LOG_FILE = "sweep.log"
"""In the sweep's folder: what Ray, MLflow and Optuna log (INFO and up), kept off the console."""

CONFIRMATION = "confirmation"
"""In the sweep's folder: the Ray Tune experiment of the confirmation runs."""


def confirmation_seeds(space: SearchSpace) -> list[int]:
    """The confirmation's seeds: ``base.seed + 1 .. base.seed + confirm.seeds`` (never the search's own)."""
    return [space.base.seed + i for i in range(1, space.confirm.seeds + 1)]


def ranked_by_arm(space: SearchSpace, rows: list[TrialRow], k: int) -> list[tuple[Any, int, TrialRow]]:
    """Each arm's best ``k`` completed trials with a checkpoint, by best val robust accuracy:
    ``(arm value, rank from 1, row)``, arms in the order written."""
    chosen = []
    for value in space.arm_values():
        mine = [r for r in rows if r.status == TrialState.COMPLETED and r.val_robust_acc is not None
                and space.in_arm(r.sampled, value)]
        mine.sort(key=lambda r: -r.val_robust_acc)
        chosen += [(value, rank, row) for rank, row in enumerate(mine[:k], start=1)]
    return chosen


def _rows(results: tune.ResultGrid, finetune_epochs: int, state_root: Path, experiment: str) -> list[TrialRow]:
    """The trials of one Ray Tune experiment (``experiment``: the sweep's name or :data:`CONFIRMATION`); a completed
    trial's ``checkpoint`` is its saved last epoch (:class:`~roli_sweep.tune.epoch_store.EpochStore`)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        status = trial_status(finetune_epochs, metrics.get("epoch"), result.error is not None)
        saved = EpochStore(state_root, experiment, trial_id, config).latest() if status == TrialState.COMPLETED else None
        rows.append(TrialRow(
            trial_id=trial_id, sampled=config, status=status,
            epochs=int(metrics.get("epoch", 0)), val_clean_acc=metrics.get("best_val_clean_acc"),
            val_robust_acc=metrics.get("best_val_robust_acc"), test_clean_acc=metrics.get("test_clean_acc"),
            test_robust_acc=metrics.get("test_robust_acc"),
            checkpoint=str(saved[0]) if saved else None,
            error=failure_reason(result.error) if result.error else None,
            seconds=float(metrics.get("time_total_s", 0.0))))
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
    trial_fn: Callable[..., Any] | None = None,
    study_storage: str | None = None,
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
            unfinished ones continued after their last saved epoch).
        probe_cache: share stage 1 between trials with the same probe settings
            (:mod:`roli_sweep.core.probe_cache`, in ``<storage_path>/<name>/probe_cache``).
        seed_from: a finished sweep in ``storage_path`` whose finished trials start this new sweep's Optuna
            study (``space`` widens that sweep's, :mod:`roli_sweep.widening`, checked by the caller).
        study_storage: the SQLAlchemy URL of the database holding the sweep's Optuna studies (named
            ``<sweep>[.<arm>]``, so one database holds many sweeps), e.g. ``postgresql+psycopg2://host/optuna``;
            None: ``sqlite:///<storage_path>/<name>/optuna.db``. A resume must name the same one.
        trial_fn: replaces :func:`roli_sweep.core.trial.run_trial` in every trial (``benchmarks/driver_scale.py``'s
            trivial trial, which times the stack around the trials); None for real trials. Not a user option.

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
            study_url = study_storage or sqlite_study_url(experiment_dir)
            return _sweep(space, space_path, name, tracking_uri, storage_path, resume, probe_cache, seed_from,
                          study_url, trial_fn)
        finally:
            if started and address:
                ray.shutdown()
            elif started:  # no Ray process of the sweep outlives it
                stop_local_runtime(storage_path)


def _sweep(space: SearchSpace, space_path: Path, name: str, tracking_uri: str, storage_path: Path,
           resume: bool, probe_cache: bool, seed_from: str | None, study_url: str,
           trial_fn: Callable[..., Any] | None = None) -> SweepOutcome:
    """:func:`run_sweep` on a running Ray runtime."""
    experiment_dir = storage_path / name
    started = time.perf_counter()
    client = MlflowClient(tracking_uri)
    parent_run_id = start_parent_run(client, space, space_path, name, resume)
    base = space.base  # typed across Ray: each trial validates only its sampled values (apply_overrides)
    threads = max(1, int(space.resources.cpu))
    cache = str(experiment_dir / PROBE_CACHE) if probe_cache else None
    state_root = experiment_dir / TRIAL_STATE
    trainable = tune.with_resources(tune.with_parameters(run_tune_trial, base=base, threads=threads,
                                                         state_root=str(state_root), probe_cache=cache,
                                                         trial_fn=trial_fn),
                                    {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    if resume:
        # completed and failed trials are kept; unfinished ones restart and continue after their last saved epoch
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        save_sweep_space(space, experiment_dir)
        tuner = _new_tuner(space, name, storage_path, study_url, trainable,
                           MlflowTrialCallback(tracking_uri, space.name, parent_run_id, name, base, space.arms))
        if seed_from:
            seeded = _seed(space, name, storage_path, study_url, seed_from)
            client.log_batch(parent_run_id, params=[Param("seeded_from", seed_from),
                                                    Param("seeded_trials", str(seeded))])
    interruption = Interruption()
    grids = []
    try:
        with interruption.during_fit():
            grids.append(tuner.fit())
        rows = _rows(grids[0], space.base.finetune.epochs, state_root, name)
        outcome = SweepOutcome(name, rows, parent_run_id, space.name, tracking_uri, storage_path,
                               interrupted=interruption.pressed,
                               experiment_id=client.get_run(parent_run_id).info.experiment_id)
        if not outcome.interrupted and space.confirm.seeds:
            outcome.confirmed = [(arm_label(space.arms, value), rank, row)
                                 for value, rank, row in ranked_by_arm(space, rows, space.confirm.top_k)]
            confirmation = _confirmation_tuner(space, name, storage_path, trainable, tracking_uri, parent_run_id,
                                               outcome.confirmed, resume)
            if confirmation is not None:
                with interruption.during_fit():
                    grids.append(confirmation.fit())
                outcome.confirmation = _rows(grids[1], space.base.finetune.epochs, state_root, CONFIRMATION)
                outcome.interrupted = interruption.pressed
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    if outcome.interrupted:
        stopped = mark_interrupted(client, parent_run_id)
        for row in [*outcome.rows, *outcome.confirmation]:  # not pruned: --resume continues them
            if row.trial_id in stopped:
                row.status = TrialState.INTERRUPTED
        return outcome
    try:
        final_seconds = final_evaluation(outcome, space, experiment_dir, base, threads, FinalProgress())
    except KeyboardInterrupt:  # the per-batch state is kept: --resume continues the evaluation
        mark_interrupted(client, parent_run_id)
        outcome.interrupted = True
        return outcome
    analyse_sweep(outcome, SweepFacts(space, study_url, confirmation_seeds(space)))
    outcome.compute = compute_accounting(grids, space, final_seconds, time.perf_counter() - started)
    log_sweep_end(client, outcome)
    return outcome


def sqlite_study_url(sweep_dir: Path) -> str:
    """The default home of a sweep's Optuna studies: ``sqlite:///<sweep_dir>/optuna.db``."""
    return f"sqlite:///{sweep_dir / OPTUNA_DB}"


def _storage(url: str, sweep_dir: Path) -> optuna.storages.RDBStorage:
    sweep_dir.mkdir(parents=True, exist_ok=True)  # SQLite does not create folders
    return optuna.storages.RDBStorage(url)


def _seed(space: SearchSpace, name: str, storage_path: Path, study_url: str, seed_from: str) -> int:
    """Start each study of the new sweep (one per arm) with the finished trials of the old sweep's same study that
    are points of the new space; an arm the old sweep did not have starts empty. The old sweep's studies are read
    from its folder's ``optuna.db`` when it has one, else from ``study_url``. Returns the trials copied."""
    old_dir = storage_path / seed_from
    old_url = sqlite_study_url(old_dir) if (old_dir / OPTUNA_DB).is_file() else study_url
    storage, source = _storage(study_url, storage_path / name), _storage(old_url, old_dir)
    directions = ["maximize"] * (2 if space.metric.multi_objective else 1)
    seeded = 0
    for value in space.arm_values():
        try:
            seeded += seed_study(storage, study_name(name, value), source, study_name(seed_from, value),
                                 DefineByRun(space, value), directions)
        except KeyError:  # optuna.load_study: no such study (an arm added by the widened space)
            continue
    return seeded


def _new_tuner(space: SearchSpace, name: str, storage_path: Path, study_url: str, trainable,
               mlflow_callback: MlflowTrialCallback) -> tune.Tuner:
    """A fresh Tuner: the Optuna studies stored at ``study_url`` (one per arm: equal budgets,
    each sampled on its own history), ASHA (one per arm), the callbacks, and one saved epoch kept per trial (the
    latest: it resumes the trial, and after the last epoch holds the tested state for the final evaluation)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(study_url, storage_path / name)
    pruned_on = f"best_{space.metric.name}"
    objectives = ["best_val_clean_acc", pruned_on] if space.metric.multi_objective else pruned_on
    modes = ["max", "max"] if space.metric.multi_objective else "max"
    arms = space.arm_values()
    per_arm = space.num_samples // len(arms)
    searchers = {case_key(value): TruthfulOptunaSearch(
        space=DefineByRun(space, value), metric=objectives, mode=modes, sampler=make_sampler(space.seed + i, per_arm),
        storage=storage, study_name=study_name(name, value), finetune_epochs=space.base.finetune.epochs)
        for i, value in enumerate(arms)}
    search = ArmedSearch(searchers, per_arm, objectives, modes) if space.arms else next(iter(searchers.values()))
    scheduler = ArmedScheduler(space, pruned_on) if space.arms else make_asha(space, pruned_on)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(search, max_concurrent=space.max_concurrent),
                                    scheduler=scheduler, num_samples=space.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path), verbose=0,
                                  callbacks=[mlflow_callback, ConsoleProgress(
                                      space.num_samples, list(space.parameters), space.base.probe.epochs,
                                      space.base.finetune.epochs)]),
    )


def _confirmation_tuner(space: SearchSpace, name: str, storage_path: Path, trainable, tracking_uri: str,
                        parent_run_id: str, confirmed: list[tuple[str, int, TrialRow]],
                        resume: bool) -> tune.Tuner | None:
    """The confirmation's Tuner: every confirmed configuration once per confirmation seed, seed by seed (so the
    arms' runs of one seed finish together), whole trials (no ASHA), each a child run tagged
    ``sweep_role=confirmation`` with ``arm``, ``confirm_rank`` and ``confirms`` (the search trial); restored when
    resuming a sweep interrupted during it. None when no arm has a completed trial to confirm."""
    folder = storage_path / name / CONFIRMATION
    if resume and tune.Tuner.can_restore(str(folder)):
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    configs, tags = [], {}
    for seed in confirmation_seeds(space):
        for arm, rank, row in confirmed:
            config = {**row.sampled, "seed": seed}
            configs.append(config)
            tags[config_fingerprint(config)] = {"arm": arm, "confirm_rank": str(rank), "confirms": row.trial_id}
    if not configs:
        return None
    callback = MlflowTrialCallback(tracking_uri, space.name, parent_run_id, name, space.base, space.arms,
                                   role="confirmation", run_tags=tags)
    return tune.Tuner(
        trainable,
        param_space={k: v for config in reversed(configs) for k, v in config.items()},  # each point replaces these
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=configs,
                                                                     max_concurrent=space.max_concurrent),
                                    num_samples=len(configs), reuse_actors=True),
        run_config=tune.RunConfig(name=CONFIRMATION, storage_path=str(storage_path / name), verbose=0,
                                  callbacks=[callback, ConsoleProgress(
                                      len(configs), [*space.parameters, "seed"], space.base.probe.epochs,
                                      space.base.finetune.epochs)]),
    )


def compute_accounting(grids: list[tune.ResultGrid], space: SearchSpace, final_seconds: float,
                       wall_seconds: float) -> dict[str, float]:
    """Where a sweep's compute went, in core-seconds (seconds × CPUs per trial): ``compute_trials_s`` (every search
    trial's Ray Tune ``time_total_s``; ``grids[0]``), ``compute_confirmation_s`` (the confirmation runs'; ``grids[1]``
    when there was one), ``compute_probe_saved_s`` (the stage-1 compute cached probes spared),
    ``compute_final_eval_s``, ``wall_s``, and ``idle_fraction``: the share of the runtime's CPU-seconds over
    the sweep's wall time that neither trials nor the final evaluation used."""
    cpu = max(space.resources.cpu, 1)
    spent, saved = [0.0, 0.0], 0.0
    for index, results in enumerate(grids):
        for result in results:
            spent[index] += float((result.metrics or {}).get("time_total_s", 0.0)) * cpu
            frame = result.metrics_dataframe
            if frame is not None and "probe" in frame:
                cached = frame[frame["probe"] == "cached"]
                saved += float(cached["probe_seconds"].sum()) * cpu
    capacity = wall_seconds * ray.cluster_resources().get("CPU", cpu)
    busy = sum(spent) + final_seconds
    return {"compute_trials_s": spent[0], "compute_confirmation_s": spent[1], "compute_probe_saved_s": saved,
            "compute_final_eval_s": final_seconds, "wall_s": wall_seconds,
            "idle_fraction": max(0.0, 1.0 - busy / capacity) if capacity > 0 and math.isfinite(busy) else 0.0}


def final_evaluation(outcome: SweepOutcome, space: SearchSpace, experiment_dir: Path, base: TrialConfig,
                     threads: int, on_piece=None) -> float:
    """Final evaluation (clean, PGD with restarts, AutoAttack) and masking checks of each arm's top
    ``space.final_top_k`` completed search trials by val robust accuracy (with confirmation, the arm's confirmed
    best comes first), their pieces spread over every free CPU or GPU (:mod:`roli_sweep.tune.final_pool`, actors
    with the trials' resources).

    Per-piece progress is kept in ``<experiment_dir>/final_eval/<trial_id>.json``, so a resumed sweep
    continues an interrupted evaluation. A failed evaluation is recorded in the row, not raised.

    Returns:
        The core-seconds (CPU seconds × CPUs per actor) the pieces took.
    """
    ranked = [row for _, _, row in ranked_by_arm(space, [r for r in outcome.rows if r.checkpoint],
                                                 space.final_top_k)]
    jobs = [FinalJob(row.trial_id, apply_overrides(base, row.sampled), row.checkpoint,
                     experiment_dir / "final_eval" / f"{row.trial_id}.json") for row in ranked]
    results = run_final_jobs(jobs, space.resources.cpu, space.resources.gpu, threads, on_piece)
    for row in ranked:
        row.final = results[row.trial_id].record
    return sum(r.busy_seconds for r in results.values()) * max(space.resources.cpu, 1)
