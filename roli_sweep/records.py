"""Typed records shared by the evaluation, the sweep, the study, MLflow and the console; importable without
torch or Ray, and importing nothing of roli_sweep.

A :class:`Check` is one gradient-masking check's outcome (:mod:`roli_sweep.evaluation.masking`); :func:`masking_tags`
turns a list of them into the MLflow tags every final evaluation carries. A :class:`FinalRecord` is one
final evaluation, success and failure in one shape (as Ray's ``air/result.py`` keeps ``error`` a field);
a finished trial's :class:`TrialState` is an enum (as Optuna's ``trial/_state.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable


class TrialState(StrEnum):
    """Where a trial of a sweep stands; the value is the ``status`` tag of its MLflow child run."""

    RUNNING = "running"
    COMPLETED = "completed"
    """Every finetune epoch ran."""
    PRUNED = "pruned"
    """ASHA stopped it at a rung."""
    FAILED = "failed"
    """It raised or diverged."""
    INTERRUPTED = "interrupted"
    """Ctrl+C stopped it; ``--resume`` continues it."""


@dataclass
class Check:
    """One check's outcome: ``status`` is ``pass`` or ``warning``; ``detail`` gives the numbers."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class ThreatModel:
    """Everything a reported robust accuracy depends on (the final evaluation's, :mod:`roli_sweep.evaluation`);
    logged as params next to it. ``eps`` and ``pgd_step_size`` are L-inf, in [0, 1] pixel units."""

    norm: str
    eps: float
    pgd_steps: int
    pgd_step_size: float
    pgd_restarts: int
    autoattack: str
    """``standard`` (the published configuration), ``custom`` or ``off``."""
    autoattack_apgd_steps: int
    autoattack_fab_steps: int
    autoattack_target_classes: int
    autoattack_square_queries: int
    n_examples: int
    input_size: str

    def params(self) -> dict[str, str]:
        """MLflow params ``final_eval.<field>``; the AutoAttack settings as ``final_eval.autoattack.<setting>``."""
        return {f"final_eval.{_PARAM_NAMES[key]}": str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ThreatModel:
        """Read what :meth:`params` wrote (study folders of versions that kept only the params)."""
        values = {key: params[f"final_eval.{name}"] for key, name in _PARAM_NAMES.items()}
        kinds = {"int": int, "float": float}  # field types as written (postponed annotations)
        return cls(**{f.name: kinds.get(f.type, str)(values[f.name]) for f in fields(cls)})

    def summary(self) -> str:
        """As the field writes it, e.g. ``L-inf 8/255, PGD-20 ×5 restarts, AutoAttack standard, 100 test images``."""
        norm = {"Linf": "L-inf"}.get(self.norm, self.norm)
        pgd = f"PGD-{self.pgd_steps}" + (f" ×{self.pgd_restarts} restarts" if self.pgd_restarts > 1 else "")
        autoattack = "no AutoAttack" if self.autoattack == "off" else f"AutoAttack {self.autoattack}"
        return f"{norm} {eps_fraction(self.eps)}, {pgd}, {autoattack}, {self.n_examples} test images"


_PARAM_NAMES = {"norm": "norm", "eps": "eps", "pgd_steps": "pgd_steps", "pgd_step_size": "pgd_step_size",
                "pgd_restarts": "pgd_restarts", "autoattack": "autoattack.version",
                "autoattack_apgd_steps": "autoattack.apgd_steps", "autoattack_fab_steps": "autoattack.fab_steps",
                "autoattack_target_classes": "autoattack.target_classes",
                "autoattack_square_queries": "autoattack.square_queries", "n_examples": "n_examples",
                "input_size": "input_size"}
"""ThreatModel field -> its MLflow param after ``final_eval.``."""


@dataclass
class FinalRecord:
    """The final evaluation of one model (:mod:`roli_sweep.evaluation.final_eval`), or why it failed.

    ``metrics`` are fractions in [0, 1] (``final_clean_acc``, ``final_pgd_acc``, ``final_autoattack_acc``, the
    AutoAttack stages' counts), ``params`` the threat model as the ``final_eval.*`` params MLflow logs,
    ``checks`` the masking checks; ``error`` is set (and the rest empty) when it failed; ``seconds`` is its wall
    time where measured.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    threat: ThreatModel | None = None
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def params(self) -> dict[str, str]:
        """The threat model as MLflow params (empty when the evaluation failed)."""
        return self.threat.params() if self.threat is not None else {}

    def warnings(self) -> list[Check]:
        """The checks that did not pass."""
        return [c for c in self.checks if c.status != "pass"]

    def to_json(self) -> dict[str, Any]:
        """The JSON the study keeps in ``final/<run>.json`` (the keys it has always had)."""
        if self.failed:
            return {"status": "failed", "error": self.error}
        data = {"status": "completed", "metrics": self.metrics, "params": self.params, "threat": asdict(self.threat),
                "checks": [[c.name, c.status, c.detail] for c in self.checks]}
        return data if self.seconds is None else {**data, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinalRecord:
        """Read what :meth:`to_json` wrote."""
        if data.get("status") != "completed":
            return cls(error=str(data.get("error") or "failed"))
        threat = ThreatModel(**data["threat"]) if "threat" in data else ThreatModel.from_params(data["params"])
        return cls(dict(data["metrics"]), threat, [Check(*c) for c in data["checks"]], seconds=data.get("seconds"))


@dataclass
class StudyJobRecord:
    """One study job's outcome (:mod:`roli_sweep.study.run`): a stage-1 probe or a whole run. ``metrics`` are the
    job's accuracies (fractions in [0, 1]); ``error`` (a traceback) is set when it failed; ``seconds`` is its
    wall time."""

    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def status(self) -> TrialState:
        return TrialState.FAILED if self.failed else TrialState.COMPLETED

    def to_json(self) -> dict[str, Any]:
        """The JSON the study keeps in ``runs/<run>.json`` (the keys it has always had)."""
        data = {"status": self.status.value, "metrics": self.metrics, "seconds": self.seconds}
        return {**data, "error": self.error} if self.failed else data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyJobRecord:
        """Read what :meth:`to_json` wrote (a failed record may lack metrics and seconds)."""
        error = None if data.get("status") == "completed" else str(data.get("error") or "failed")
        return cls(dict(data.get("metrics") or {}), float(data.get("seconds", 0.0)), error)


def masking_tags(checks: list[Check]) -> dict[str, str]:
    """MLflow tags: ``masking`` (pass only if every check passed), ``masking.<check>`` and its detail."""
    tags = {"masking": "pass" if all(c.status == "pass" for c in checks) else "warning"}
    for c in checks:
        tags[f"masking.{c.name}"] = c.status
        tags[f"masking.{c.name}.detail"] = c.detail[:5000]
    return tags


def eps_fraction(eps: float) -> str:
    """An L-inf radius in [0, 1] pixel units as the field writes it: ``8/255`` when it is a whole number of
    255ths, else the decimal (``0.1``)."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:.4g}"


@dataclass
class Finding:
    """One end-of-sweep analysis' result (:mod:`roli_sweep.analysis`): what the parent run logs (``metrics``,
    ``tags``, the PNG ``figure`` drawn by ``plot(path)``, a ``text`` artifact) and what the console prints
    (``warnings`` in yellow, each ``(label, message)``, a ``table``: title, column names, rows of strings, and
    ``notes``)."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    table: tuple[str, list[str], list[list[str]]] | None = None
    figure: str | None = None
    plot: Callable[[Path], Any] | None = None
    text: tuple[str, str] | None = None
    """An artifact of the parent run: ``(file name, its text)``, e.g. ``comparison.md``."""
    notes: list[str] = field(default_factory=list)
    """Plain lines the console prints after the table."""


@dataclass(frozen=True)
class EdgeWarning:
    """One parameter whose best trials sit at an edge of its range."""

    parameter: str
    bound: str
    """``max`` or ``min``: the bound to move."""
    message: str


@dataclass
class TrialRow:
    """One line of the end-of-sweep table. Accuracies are fractions in [0, 1] (None if never reported)."""

    trial_id: str
    sampled: dict[str, Any]
    status: TrialState
    epochs: int
    val_clean_acc: float | None
    val_robust_acc: float | None
    test_clean_acc: float | None
    test_robust_acc: float | None
    error: str | None = None
    checkpoint: str | None = None
    final: FinalRecord | None = None  # the final evaluation (top-k trials only)
    seconds: float = 0.0
    """The trial's Ray Tune ``time_total_s`` (wall seconds of its own actor)."""


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
    findings: list[Finding] = field(default_factory=list)
    """What the end-of-sweep analyses found (:mod:`roli_sweep.analysis`), in their registration order."""
    confirmed: list[tuple[str, int, TrialRow]] = field(default_factory=list)
    """The search trials the confirmation reran: ``(arm label, rank in its arm from 1, row)``."""
    confirmation: list[TrialRow] = field(default_factory=list)
    """The confirmation runs (``sampled``: the confirmed trial's values and ``seed``)."""

    def all_failed(self) -> bool:
        """Trials ran and every one of them failed."""
        return bool(self.rows) and all(r.status == TrialState.FAILED for r in self.rows)

    def completed(self) -> list[TrialRow]:
        """Trials that ran every finetune epoch and reported validation accuracies."""
        return [r for r in self.rows if r.status == TrialState.COMPLETED and r.val_robust_acc is not None]

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
