"""The final evaluation of a sweep's best trials on the whole machine (or cluster): a pool of Ray actors runs the
independent pieces of every evaluation (:class:`roli_sweep.evaluation.final_eval.FinalEvaluation`: batches of test examples
with PGD restarts and AutoAttack, and the masking checks) at once, as many as the free CPUs (or GPUs) allow.

Each actor rebuilds a trial's tested model once from its checkpoint and keeps it for the next piece of the
same trial. The driver writes each finished piece to the trial's state file (``final_eval/<trial>.json``) as
it arrives, so Ctrl+C loses no finished piece and ``--resume`` runs only the rest. A failing evaluation
is recorded as the trial's error; the others go on. Reference: Ray ``ray.util.ActorPool`` docs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util import ActorPool

from roli_sweep.config import TrialConfig
from roli_sweep.records import FinalRecord, ThreatModel


@dataclass
class FinalJob:
    """One trial's final evaluation: its config, the checkpoint folder holding its tested state, its state file."""

    name: str
    cfg: TrialConfig
    checkpoint_dir: str
    state_path: Path


@dataclass
class FinalOutcome:
    """What :func:`run_final_jobs` found for one job: its record (or error) and the seconds its pieces took."""

    record: FinalRecord
    busy_seconds: float


class FinalEvalWorker:
    """A Ray actor that runs pieces of final evaluations (one model held at a time)."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._key: str | None = None
        self._held: tuple | None = None

    def _load(self, cfg: TrialConfig, checkpoint_dir: str):
        if self._key != checkpoint_dir:
            from roli_sweep.evaluation.final_eval import FinalEvaluation
            from roli_sweep.core.trial import BEST_STATE_FILE, load_trained

            model, splits, device = load_trained(cfg, Path(checkpoint_dir) / BEST_STATE_FILE)
            self._key, self._held = checkpoint_dir, (model, FinalEvaluation(cfg, splits.test, splits.num_classes), device)
        return self._held

    def plan(self, cfg: TrialConfig, checkpoint_dir: str) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        """The threat model (as a dict) and the pieces ``(kind, index)`` of one evaluation."""
        from dataclasses import asdict

        _, evaluation, _ = self._load(cfg, checkpoint_dir)
        return asdict(evaluation.threat), [(p.kind, p.index) for p in evaluation.pieces()]

    def run(self, name: str, cfg: TrialConfig, checkpoint_dir: str, kind: str,
            index: Any) -> tuple[str, str, dict[str, Any] | None, float, str | None]:
        """``(name, piece id, outcome, seconds, error)``: one piece's outcome and the seconds it took, or the
        failure as ``Type: message``."""
        from roli_sweep.evaluation.final_eval import Piece
        from roli_sweep.tune.failures import failure_reason

        piece, started = Piece(kind, index), time.perf_counter()
        try:
            model, evaluation, device = self._load(cfg, checkpoint_dir)
            outcome = evaluation.run(piece, model, device)
        except Exception as err:  # noqa: BLE001 - the driver records it with the trial
            return name, piece.id, None, time.perf_counter() - started, failure_reason(err)
        return name, piece.id, outcome, time.perf_counter() - started, None

    def report(self, cfg: TrialConfig, checkpoint_dir: str, outcomes: dict[str, Any]) -> FinalRecord:
        """The record (metrics, threat-model params, checks) assembled from every piece's outcome."""
        _, evaluation, _ = self._load(cfg, checkpoint_dir)
        return evaluation.report(outcomes).record()


def run_final_jobs(jobs: list[FinalJob], cpus: float, gpus: float, threads: int,
                   on_piece: Callable[[str, str, int, int], None] | None = None) -> dict[str, FinalOutcome]:
    """Run every job's pieces on a pool of Ray actors, ``cpus`` / ``gpus`` each, as many as the cluster has room for.

    Args:
        jobs: the evaluations; their state files are read (to skip finished pieces) and rewritten.
        threads: torch threads per actor.
        on_piece: called as ``on_piece(job name, piece id, done, total)`` after each piece.

    Returns:
        Per job name: its :class:`~roli_sweep.records.FinalRecord` (``error`` set when it failed) and the busy seconds.

    Raises:
        KeyboardInterrupt: Ctrl+C; every finished piece is already in its state file.
    """
    from roli_sweep.evaluation.final_eval import load_outcomes, save_outcomes

    if not jobs:
        return {}
    total = ray.cluster_resources()
    room = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // max(cpus, 1e-9))
    actor = ray.remote(FinalEvalWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
    payload = {job.name: job.cfg for job in jobs}
    actors = [actor.remote(threads)]  # plans the jobs, then joins the pool; the pool's first one reports
    try:
        outcomes: dict[str, FinalOutcome] = {}
        pending: list[tuple[str, str, Any]] = []
        state: dict[str, tuple[ThreatModel, dict[str, Any], int]] = {}
        for job in jobs:
            try:
                threat_dict, pieces = ray.get(actors[0].plan.remote(payload[job.name], job.checkpoint_dir))
                threat = ThreatModel(**threat_dict)
                done = load_outcomes(job.state_path, threat)
            except Exception as err:  # noqa: BLE001 - recorded with the trial; the other evaluations go on
                outcomes[job.name] = FinalOutcome({"error": _first_line(err)}, 0.0)
                continue
            state[job.name] = (threat, done, len(pieces))
            pending += [(job.name, kind, index) for kind, index in pieces if f"{kind}:{index}" not in done]
        by_name = {job.name: job for job in jobs}
        busy = dict.fromkeys(state, 0.0)
        failed: dict[str, str] = {}
        if pending:
            actors += [actor.remote(threads) for _ in range(max(1, min(room, len(pending))) - 1)]
            pool = ActorPool(actors)
            for name, kind, index in pending:
                pool.submit(lambda a, v: a.run.remote(v[0], payload[v[0]], by_name[v[0]].checkpoint_dir, v[1], v[2]),
                            (name, kind, index))
            while pool.has_next():
                name, piece_id, outcome, seconds, error = pool.get_next_unordered()
                busy[name] += seconds
                if error is not None:
                    failed.setdefault(name, error)
                    continue
                threat, done, count = state[name]
                done[piece_id] = outcome
                save_outcomes(by_name[name].state_path, threat, done)
                if on_piece is not None:
                    on_piece(name, piece_id, len(done), count)
        for name, (threat, done, _) in state.items():
            if name in failed:
                outcomes[name] = FinalOutcome(FinalRecord(error=failed[name]), busy[name])
                continue
            try:
                record = ray.get(actors[0].report.remote(payload[name], by_name[name].checkpoint_dir, done))
            except Exception as err:  # noqa: BLE001
                record = FinalRecord(error=_first_line(err))
            outcomes[name] = FinalOutcome(record, busy[name])
    finally:
        for worker in actors:
            ray.kill(worker)
    return outcomes


def _first_line(err: BaseException) -> str:
    from roli_sweep.tune.failures import failure_reason

    return failure_reason(err)
