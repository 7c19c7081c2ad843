"""A study on Ray Tune: Optuna TPE samples, ASHA prunes on validation robust accuracy, MLflow records.

Each Ray Tune trial runs :func:`roli_sweep.trial.run_trial` on the search space's base config with
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
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials run in the driver's working directory
# the end of stage 1 is reported (epoch 0, with the probe as checkpoint) before any finetune metric exists;
# ASHA and the searcher skip results without their metric, Tune's strict check would refuse it
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# Ray Tune's new output engine prints its "Configuration for experiment" box and a TensorBoard hint even at
# verbose=0; the legacy one prints nothing there. The sweep's own view is roli_sweep.tune.callbacks'.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from mlflow.entities import Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from roli_sweep.analysis import log_sweep_analysis  # noqa: E402
from roli_sweep.config import ParameterSpec, SearchSpace, TrialConfig, apply_overrides  # noqa: E402
from roli_sweep.console import FinalProgress  # noqa: E402
from roli_sweep.edges import EdgeWarning, edge_warnings  # noqa: E402
from roli_sweep.plots import plot_pareto  # noqa: E402
from roli_sweep.tracking import (  # noqa: E402
    finish_parent_run,
    log_final_evaluations,
    mark_interrupted,
    start_parent_run,
    trial_status,
)
from roli_sweep.tune.callbacks import ConsoleProgress, MlflowTrialCallback, failure_reason  # noqa: E402
from roli_sweep.tune.auth_token import make_token_private  # noqa: E402
from roli_sweep.tune.runtime import logs_to_file, start_local_runtime, stop_local_runtime  # noqa: E402
from roli_sweep.tune.searcher import TruthfulOptunaSearch, seed_study  # noqa: E402
from roli_sweep.tune.final_pool import FinalJob, run_final_jobs  # noqa: E402
from roli_sweep.tune.trainable import run_tune_trial  # noqa: E402
from roli_sweep.widening import save_sweep_space  # noqa: E402

OPTUNA_DB = "optuna.db"
"""The sweep's Optuna study, in its Ray Tune experiment folder (SQLite RDB storage)."""

PROBE_CACHE = "probe_cache"
"""In the sweep's folder: the stage-1 probes its trials share (:mod:`roli_sweep.probe_cache`)."""

LOG_FILE = "sweep.log"
"""In the sweep's folder: what Ray, MLflow and Optuna log (INFO and up), kept off the console."""

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl+C (128 + SIGINT), as shells report it."""


def tune_domain(spec: ParameterSpec) -> Any:
    """The Ray Tune sampling domain of one parameter (int_uniform includes ``max``)."""
    if spec.values is not None:
        return tune.choice(spec.values)
    if spec.distribution == "uniform":
        return tune.uniform(spec.min, spec.max)
    if spec.distribution == "log_uniform_values":
        return tune.loguniform(spec.min, spec.max)
    return tune.randint(int(spec.min), int(spec.max) + 1)


@dataclass
class TrialRow:
    """One line of the end-of-sweep table. Accuracies are fractions in [0, 1] (None if never reported)."""

    trial_id: str
    sampled: dict[str, Any]
    status: str
    epochs: int
    val_clean_acc: float | None
    val_robust_acc: float | None
    test_clean_acc: float | None
    test_robust_acc: float | None
    error: str | None = None
    checkpoint: str | None = None
    final: dict[str, Any] | None = None  # the final evaluation (top-k trials only)


@dataclass
class SweepOutcome:
    """What a sweep did: its name, the trials, where things are stored."""

    name: str
    rows: list[TrialRow]
    parent_run_id: str
    experiment: str
    tracking_uri: str
    storage_path: Path
    interrupted: bool = False
    """Ctrl+C stopped the sweep (trials or final evaluation); ``--resume --name`` continues it."""
    experiment_id: str = ""
    compute: dict[str, float] | None = None
    """Where the compute went (:func:`compute_accounting`); None when the sweep did not finish."""
    edges: list[EdgeWarning] = field(default_factory=list)
    """Parameters whose best trials sit at an edge of their range (:mod:`roli_sweep.edges`)."""
    importance: dict[str, float] | None = None
    """fANOVA importance of each sampled parameter (:mod:`roli_sweep.analysis`); None with too few trials."""

    def completed(self) -> list[TrialRow]:
        """Trials that ran every finetune epoch and reported validation accuracies."""
        return [r for r in self.rows if r.status == "completed" and r.val_robust_acc is not None]

    def best(self) -> TrialRow | None:
        """The completed trial with the highest best validation robust accuracy."""
        return max(self.completed(), key=lambda r: r.val_robust_acc, default=None)

    def pareto_front(self) -> list[TrialRow]:
        """Completed trials no other completed trial beats on both val clean and val robust accuracy, by clean."""
        done = self.completed()
        front = [r for r in done if not any(
            o.val_clean_acc >= r.val_clean_acc and o.val_robust_acc >= r.val_robust_acc
            and (o.val_clean_acc, o.val_robust_acc) != (r.val_clean_acc, r.val_robust_acc) for o in done)]
        return sorted(front, key=lambda r: r.val_clean_acc)


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
            checkpoint=result.checkpoint.path if result.checkpoint and status == "completed" else None,
            error=failure_reason(result.error) if result.error else None))
    return rows


class Interruption:
    """Ctrl+C during a sweep: the first press stops Ray Tune gracefully, a second one exits at once.

    Ray Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``): it stays installed
    after ``fit()`` and would swallow a Ctrl+C during the final evaluation. The first press raises
    SIGUSR1, Ray Tune's other graceful-stop signal, and remembers it. From then on until the process ends,
    a second press calls ``os._exit(130)`` from a watcher thread woken by :func:`signal.set_wakeup_fd`,
    so it takes effect even while the main thread is inside a C call (a Python handler waits for the main
    thread to return to the interpreter, and Ray's shutdown can hold it for seconds).
    Outside :meth:`during_fit` and before a first press, Ctrl+C raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._presses = 0

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:
            os._exit(INTERRUPTED_EXIT)
        self.pressed = True
        print("Ctrl+C: stopping the trials after their current step (again to exit at once)", flush=True)
        signal.raise_signal(signal.SIGUSR1)

    def _watch(self, wakeup: int) -> None:
        """Count SIGINTs as the C-level handler writes them to ``wakeup``; exit at the second."""
        while signals := os.read(wakeup, 64):  # b"" once the writing end is closed
            for signum in signals:
                if signum == signal.SIGINT:
                    self._presses += 1
                    if self._presses >= 2:
                        os._exit(INTERRUPTED_EXIT)
        os.close(wakeup)

    @contextmanager
    def during_fit(self) -> Iterator[None]:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
        wakeup, written = os.pipe()
        os.set_blocking(written, False)
        previous_wakeup = signal.set_wakeup_fd(written, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch, args=(wakeup,), name="second-ctrl-c", daemon=True).start()
        try:
            yield
        finally:
            signal.signal(signal.SIGUSR1, previous[signal.SIGUSR1])
            if not self.pressed:  # after a first press, a second one exits at once until the process ends
                signal.signal(signal.SIGINT, previous[signal.SIGINT])
                signal.set_wakeup_fd(previous_wakeup)
                os.close(written)  # the watcher's read returns b"" and it ends


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
            (:mod:`roli_sweep.probe_cache`, in ``<storage_path>/<name>/probe_cache``).
        seed_from: a finished sweep in ``storage_path`` whose finished trials start this new sweep's Optuna
            study (``space`` widens that sweep's, :mod:`roli_sweep.widening`, checked by the caller).

    Raises:
        FileNotFoundError: ``resume`` asked for but no restorable sweep at ``storage_path / name``.
    """
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
    base = space.base.model_dump(mode="json")
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
                row.status = "interrupted"
        return outcome
    best = outcome.best()
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "pruned", "failed")}
    best_metrics = None
    if best is not None:
        best_metrics = {"val_clean_acc": best.val_clean_acc, "val_robust_acc": best.val_robust_acc,
                        "test_clean_acc": best.test_clean_acc, "test_robust_acc": best.test_robust_acc}
    if space.metric.multi_objective and outcome.completed():
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "pareto_front.png"
            plot_pareto(outcome.completed(), outcome.pareto_front(), png, title=f"sweep {name}")
            client.log_artifact(parent_run_id, str(png))
    try:
        final_seconds = final_evaluation(outcome, space, experiment_dir, base, threads, FinalProgress())
    except KeyboardInterrupt:  # the per-batch state is kept: --resume continues the evaluation
        mark_interrupted(client, parent_run_id)
        outcome.interrupted = True
        return outcome
    log_final_evaluations(client, space.name, name, parent_run_id, [(r.trial_id, r.final) for r in rows if r.final])
    outcome.edges = edge_warnings(space.parameters, [(r.sampled, r.val_robust_acc) for r in outcome.completed()])
    if outcome.edges:
        client.log_batch(parent_run_id, tags=[RunTag(f"search_space.edge.{w.parameter}", w.message[:5000])
                                              for w in outcome.edges])
    outcome.importance = log_sweep_analysis(client, parent_run_id, f"sqlite:///{experiment_dir / OPTUNA_DB}", name,
                                            rows, space.base.finetune.head_init, space.metric.multi_objective)
    outcome.compute = compute_accounting(results, space, final_seconds, time.perf_counter() - started)
    finish_parent_run(client, parent_run_id, best_metrics, counts, best.trial_id if best else None, outcome.compute)
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


def final_evaluation(outcome: SweepOutcome, space: SearchSpace, experiment_dir: Path, base: dict[str, Any],
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
    jobs = [FinalJob(row.trial_id, apply_overrides(TrialConfig.model_validate(base), row.sampled), row.checkpoint,
                     experiment_dir / "final_eval" / f"{row.trial_id}.json") for row in ranked[:space.final_top_k]]
    results = run_final_jobs(jobs, space.resources.cpu, space.resources.gpu, threads, on_piece)
    for row in ranked[:space.final_top_k]:
        row.final = results[row.trial_id].record
    return sum(r.busy_seconds for r in results.values()) * max(space.resources.cpu, 1)
