"""``run_sweep.py study``: a grid study of the paper's findings F1-F3, resumable and runnable in parts.

The grid is source backbones x transfer methods x {RanLI, RoLI} x targets (a :class:`StudyConfig`).
Each cell (backbone, target, method, head_init) picks its finetuning learning rate on validation:
every lr of its grid (the method's, or the method's for that head init) runs with the first seed,
and the lr with the best val robust accuracy wins. The other seeds then run at each init's own best
lr (the paper tunes each init separately) and, for a method with one grid for both inits, also at
the *matched* lr (the grid lr with the best val robust accuracy averaged over RoLI and RanLI), so
RoLI - RanLI can be read both ways. Test accuracies are never used for any choice.

Stage 1 (the adversarial linear probe) depends only on backbone, target and seed, so it runs once
per (backbone, target, seed) and is shared by every finetuning run, which starts from RNGs reseeded
the same way whether or not it computed the probe itself (:func:`roli_sweep.core.trial.run_trial`).

State lives in a folder (``<out>/<study name>/``): ``probes/<probe key>.safetensors`` (the probe cache a sweep
uses, :mod:`roli_sweep.core.probe_cache`),
``runs/<id>.json`` and ``models/<id>/`` (the tested state), written as each job ends, so an interrupted study continues where it stopped
and ``--only key=value`` filters run it in parts. Jobs run as Ray tasks (one CPU or GPU share
each); every finished run also becomes an MLflow child run of the study's parent run.
"""
from __future__ import annotations

import itertools
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from roli_sweep.config import ConfigError, StudyConfig, TrialConfig
from roli_sweep.records import FinalRecord, StudyJobRecord

FILTER_KEYS = ("backbone", "target", "method", "head_init", "seed")


@dataclass(frozen=True)
class ProbeKey:
    """One stage-1 probe: shared by every run with this backbone, target and seed."""

    backbone: str
    target: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.backbone}-{self.target}-s{self.seed}"


@dataclass(frozen=True)
class RunKey:
    """One probe-then-finetune run of the grid."""

    backbone: str
    target: str
    method: str
    head_init: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.backbone}-{self.target}-{self.method}-{self.head_init}-lr{self.lr:.3g}-s{self.seed}"

    @property
    def probe(self) -> ProbeKey:
        return ProbeKey(self.backbone, self.target, self.seed)

    @property
    def group(self) -> tuple[str, str, str]:
        return self.backbone, self.target, self.method


def parse_filters(items: Iterable[str]) -> dict[str, set[str]]:
    """``["backbone=robust", "method=lora,full"]`` -> ``{"backbone": {"robust"}, "method": {"lora", "full"}}``.

    Raises:
        ConfigError: an item without ``=`` or with a key outside :data:`FILTER_KEYS`.
    """
    filters: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in FILTER_KEYS or not values:
            raise ConfigError(f"--only: value {item!r} not allowed: write key=value[,value] with key one of "
                              f"{list(FILTER_KEYS)}")
        filters.setdefault(key, set()).update(values.split(","))
    return filters


def _selected(key: ProbeKey | RunKey, filters: dict[str, set[str]]) -> bool:
    fields = asdict(key)
    return all(str(fields[k]) in allowed for k, allowed in filters.items() if k in fields)


class StudyState:
    """The study's folder: finished probes and runs, read back on every resume.

    The probes are a :class:`roli_sweep.core.probe_cache.ProbeCache` in ``probes/``, keyed by
    :func:`roli_sweep.core.probe_cache.probe_key` of the probe's own settings, as a sweep keys its probes.
    """

    def __init__(self, folder: Path, study: StudyConfig) -> None:
        from roli_sweep.core.probe_cache import ProbeCache

        self.folder, self.study = folder, study
        self.probes = ProbeCache(folder / "probes")
        self._probe_keys: dict[ProbeKey, str] = {}
        (folder / "probes").mkdir(parents=True, exist_ok=True)
        (folder / "runs").mkdir(parents=True, exist_ok=True)

    def probe_config(self, key: ProbeKey) -> TrialConfig:
        """A run config of ``key``'s backbone, target and seed (stage 1 does not depend on the rest)."""
        study = self.study
        return study.run_config(key.backbone, key.target, next(iter(study.methods)), study.head_inits[0],
                                study.base.finetune.lr, key.seed)

    def probe_path(self, key: ProbeKey) -> Path:
        from roli_sweep.core.probe_cache import probe_key

        if key not in self._probe_keys:  # validating a config per call would dominate the scheduling loop
            self._probe_keys[key] = probe_key(self.probe_config(key))
        return self.probes.path(self._probe_keys[key])

    def has_probe(self, key: ProbeKey) -> bool:
        return self.probe_path(key).is_file()

    def model_dir(self, key: RunKey) -> Path:
        """Where a run keeps its tested best-epoch state (for the final evaluation)."""
        return self.folder / "models" / key.id

    def final_path(self, key: RunKey) -> Path:
        """The final evaluation's record of a run (``final/<id>.json``; ``.state.json`` while it runs)."""
        return self.folder / "final" / f"{key.id}.json"

    def final(self, key: RunKey) -> FinalRecord | None:
        """The run's final evaluation, or None before it finished."""
        path = self.final_path(key)
        return FinalRecord.from_json(json.loads(path.read_text())) if path.is_file() else None

    def run_path(self, key: RunKey) -> Path:
        return self.folder / "runs" / f"{key.id}.json"

    def result(self, key: RunKey) -> StudyJobRecord | None:
        """The saved record of a run (completed or failed), or None if it never finished."""
        path = self.run_path(key)
        return StudyJobRecord.from_json(json.loads(path.read_text())) if path.is_file() else None

    def save_result(self, key: RunKey, record: StudyJobRecord) -> None:
        tmp = self.run_path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": asdict(key), **record.to_json()}, indent=1))
        tmp.replace(self.run_path(key))  # atomic: a killed study never leaves half a record

    def completed(self, key: RunKey) -> dict[str, float] | None:
        """A completed run's metrics, else None."""
        record = self.result(key)
        return record.metrics if record is not None and not record.failed else None


def selection_runs(study: StudyConfig) -> list[RunKey]:
    """Every lr of every cell with the first seed: the runs that choose the learning rates."""
    seed = study.seeds[0]
    return [RunKey(b, t, m, init, lr, seed) for b in study.backbones for t in study.targets
            for m, spec in study.methods.items() for init in study.head_inits for lr in spec.grid(init)]


@dataclass
class LrChoice:
    """The learning rates chosen for one (backbone, target, method) on validation."""

    own: dict[str, float]  # head_init -> its best lr
    matched: float | None  # the lr best on average over the head inits; None with a grid per head init


def choose_lrs(study: StudyConfig, state: StudyState, group: tuple[str, str, str]) -> LrChoice | None:
    """Pick the lrs of one group from its selection runs' val robust accuracy; None until all have finished.

    Failed selection runs count as val robust accuracy -1 (never chosen unless all failed).
    """
    backbone, target, method = group
    seed = study.seeds[0]
    scores: dict[str, dict[float, float]] = {}
    spec = study.methods[method]
    for init in study.head_inits:
        for lr in spec.grid(init):
            record = state.result(RunKey(backbone, target, method, init, lr, seed))
            if record is None:
                return None
            scores.setdefault(init, {})[lr] = record.metrics.get("val_robust_acc", -1.0)
    own = {init: max(by_lr, key=by_lr.get) for init, by_lr in scores.items()}
    if not spec.shared:
        return LrChoice(own, None)
    matched = max(spec.lrs, key=lambda lr: statistics.fmean(scores[init][lr] for init in study.head_inits))
    return LrChoice(own, matched)


def chosen_groups(study: StudyConfig, state: StudyState) -> Iterator[tuple[tuple[str, str, str], LrChoice]]:
    """Every (backbone, target, method) whose lrs are chosen, with the choice."""
    for group in itertools.product(study.backbones, study.targets, study.methods):
        choice = choose_lrs(study, state, group)
        if choice is not None:
            yield group, choice


def seed_runs(study: StudyConfig, state: StudyState) -> list[RunKey]:
    """The remaining seeds' runs of every group whose lrs are chosen: own best lr (and matched lr, if any) per init."""
    return [RunKey(*group, init, lr, seed) for group, choice in chosen_groups(study, state)
            for init in study.head_inits
            for lr in sorted({choice.own[init]} | ({choice.matched} if choice.matched is not None else set()))
            for seed in study.seeds[1:]]


def final_runs(study: StudyConfig, state: StudyState) -> list[RunKey]:
    """The runs that get the final evaluation: each cell at its own lr with the first seed, once chosen."""
    return [RunKey(*group, init, choice.own[init], study.seeds[0]) for group, choice in chosen_groups(study, state)
            for init in study.head_inits]


def _final_job(cfg: TrialConfig, model_dir: str, final_path: str) -> FinalRecord:
    from roli_sweep.evaluation.final_eval import evaluate_and_check
    from roli_sweep.core.trial import BEST_STATE_FILE, load_trained

    started = time.perf_counter()
    try:
        model, splits, device = load_trained(cfg, Path(model_dir) / BEST_STATE_FILE)
        report = evaluate_and_check(model, splits.test, cfg, splits.num_classes, device,
                                    Path(final_path).with_suffix(".state.json"))
    except Exception:  # noqa: BLE001 - recorded; the other evaluations go on
        return FinalRecord(error=traceback.format_exc(limit=5))
    return replace(report.record(), seconds=time.perf_counter() - started)


def _probe_job(cfg: TrialConfig, cache_dir: str) -> StudyJobRecord:
    from roli_sweep.core.probe_cache import ProbeCache, probe_key
    from roli_sweep.core.trial import probe_and_test

    started = time.perf_counter()
    try:
        probe = probe_and_test(cfg)
    except Exception:  # noqa: BLE001 - reported; its runs are skipped in this invocation
        return StudyJobRecord(seconds=time.perf_counter() - started, error=traceback.format_exc(limit=5))
    seconds = time.perf_counter() - started
    ProbeCache(Path(cache_dir)).store(probe_key(cfg), probe, seconds)
    return StudyJobRecord(probe.metrics, seconds)


def _run_job(cfg: TrialConfig, cache_dir: str, model_dir: str) -> StudyJobRecord:
    from roli_sweep.core.probe_cache import ProbeCache, probe_key
    from roli_sweep.core.trial import run_trial

    started = time.perf_counter()
    try:
        probe, _ = ProbeCache(Path(cache_dir)).load(probe_key(cfg))
        result = run_trial(cfg, probe=probe, checkpoint_dir=Path(model_dir))
    except Exception:  # noqa: BLE001 - a failed run is recorded and the study goes on
        return StudyJobRecord(seconds=time.perf_counter() - started, error=traceback.format_exc(limit=5))
    return StudyJobRecord(result.metrics, time.perf_counter() - started)


class StudyObserver(Protocol):
    """Told of every finished study job, in the driver (the MLflow recorder and the console's lines)."""

    def on_probe(self, key: ProbeKey, record: StudyJobRecord) -> None: ...

    def on_run(self, key: RunKey, record: StudyJobRecord) -> None: ...

    def on_final(self, key: RunKey, record: FinalRecord) -> None: ...


@dataclass
class StudyProgress:
    """What one invocation did."""

    probes_run: int = 0
    runs_completed: int = 0
    runs_failed: int = 0
    finals_done: int = 0
    seconds: float = 0.0


def run_study(study: StudyConfig, state: StudyState, filters: dict[str, set[str]],
              observers: Sequence[StudyObserver], num_cpus: int | None = None,
              address: str | None = None, final: bool = True) -> StudyProgress:
    """Run every selected probe and run that has no completed record yet (failed runs are retried).

    Work is handed to Ray ``max_concurrent`` jobs at a time, probes first; seed runs of a group are
    added as soon as its selection runs have chosen the lrs. A failed probe skips its runs for the
    rest of this invocation (the next one tries it again). With ``final``, each cell's own-lr run
    with the first seed then gets the final evaluation (``base.eval.final``: clean, PGD with
    restarts, AutoAttack) and the masking checks, once every selected run is done; a failed one
    is retried by the next invocation. Each of ``observers`` is told of every job as it ends, in this
    process (the MLflow recorder, the console).
    """
    import ray

    started = time.perf_counter()
    progress = StudyProgress()
    started_ray = not ray.is_initialized()  # a runtime someone else started is left running
    if started_ray:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False)
    opts = {"num_cpus": study.resources.cpu, "num_gpus": study.resources.gpu, "max_retries": 0}
    probe_task = ray.remote(_probe_job).options(**opts)
    run_task = ray.remote(_run_job).options(**opts)
    final_task = ray.remote(_final_job).options(**opts)
    in_flight: dict[Any, tuple[str, ProbeKey | RunKey]] = {}
    failed_probes: set[ProbeKey] = set()
    tried_finals: set[RunKey] = set()

    def pending() -> list[ProbeKey | RunKey]:
        runs = [k for k in selection_runs(study) + seed_runs(study, state)
                if _selected(k, filters) and state.completed(k) is None and k.probe not in failed_probes]
        probes = sorted({k.probe for k in runs if not state.has_probe(k.probe)}, key=lambda p: p.id)
        ready = [("run", k) for k in runs if state.has_probe(k.probe)]
        finals = []
        if final and not runs:
            finals = [("final", k) for k in final_runs(study, state) if _selected(k, filters)
                      and state.completed(k) is not None and k not in tried_finals
                      and (state.final(k) is None or state.final(k).failed)]
        busy = set(in_flight.values())
        return [item for item in [("probe", k) for k in probes] + ready + finals if item not in busy]

    try:
        while True:
            todo = pending()
            while todo and len(in_flight) < study.max_concurrent:
                kind, key = todo.pop(0)
                if kind == "final":
                    tried_finals.add(key)
                    cfg = study.run_config(key.backbone, key.target, key.method, key.head_init, key.lr, key.seed)
                    state.final_path(key).parent.mkdir(exist_ok=True)
                    ref = final_task.remote(cfg, str(state.model_dir(key)),
                                            str(state.final_path(key)))
                elif kind == "probe":
                    ref = probe_task.remote(state.probe_config(key), str(state.probes.folder))
                else:
                    cfg = study.run_config(key.backbone, key.target, key.method, key.head_init, key.lr, key.seed)
                    ref = run_task.remote(cfg, str(state.probes.folder),
                                          str(state.model_dir(key)))
                in_flight[ref] = (kind, key)
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1)
            kind, key = in_flight.pop(done[0])
            if kind == "final":
                record = ray.get(done[0])
                state.final_path(key).write_text(json.dumps(record.to_json(), indent=1))
                for observer in observers:
                    observer.on_final(key, record)
                progress.finals_done += 1
                continue
            if kind == "probe":
                record = ray.get(done[0])
                if record.failed:
                    failed_probes.add(key)
                for observer in observers:
                    observer.on_probe(key, record)
                progress.probes_run += 1
                continue
            record = ray.get(done[0])
            state.save_result(key, record)
            for observer in observers:
                observer.on_run(key, record)
            if not record.failed:
                progress.runs_completed += 1
            else:
                progress.runs_failed += 1
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if started_ray:
            ray.shutdown()
    progress.seconds = time.perf_counter() - started
    return progress
