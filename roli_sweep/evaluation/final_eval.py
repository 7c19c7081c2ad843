"""The final, reported evaluation of a trained model on the test split: clean, PGD with restarts, AutoAttack.

Validation accuracies select models; this is what gets reported (../shared/PAPER.md, "Checking
robustness claims"): clean accuracy, PGD-k with random restarts (an example counts as robust only if
it is classified correctly clean and no restart breaks it) and standard AutoAttack as published
(Croce & Hein, ICML 2020: APGD-CE, APGD-T, FAB-T, Square; :mod:`roli_sweep.evaluation.autoattack`), on the full
test split or its first ``n_examples`` (a stated subset). The model runs in eval mode in fp32.

:func:`evaluate_and_check` adds the gradient-masking checks of :mod:`roli_sweep.evaluation.masking`.

The evaluation is split into independent pieces (:class:`FinalEvaluation`): batches of test examples
and the pieces of the masking checks. Their outcomes are written to a JSON state file as each piece
finishes, so an interrupted run continues with the pieces not yet done; a state written for another
threat model is refused.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from roli_sweep.core.attacks import pgd_broken
from roli_sweep.evaluation.autoattack import ROBUST, STAGES, autoattack_outcomes, target_classes
from roli_sweep.config import FinalEvalConfig, TrialConfig, evaluation_attack
from roli_sweep.evaluation.masking import Evidence, judge, measure, measured_checks
from roli_sweep.records import Check, FinalRecord, ThreatModel


@dataclass
class FinalEvalResult:
    """Accuracies (fractions in [0, 1]) over ``threat.n_examples`` test examples, and per-example outcomes."""

    threat: ThreatModel
    clean: list[bool]
    pgd: list[bool]
    autoattack: list[bool] | None

    def metrics(self) -> dict[str, float]:
        n = len(self.clean)
        out = {"final_clean_acc": sum(self.clean) / n, "final_pgd_acc": sum(self.pgd) / n}
        if self.autoattack is not None:
            out["final_autoattack_acc"] = sum(self.autoattack) / n
        return out


def threat_model(cfg: FinalEvalConfig, eps: float, n_examples: int, input_shape: tuple[int, ...],
                 num_classes: int) -> ThreatModel:
    """The threat model of a final evaluation at ``eps`` ([0, 1] pixel units) on images of ``input_shape`` (C, H, W)."""
    aa = cfg.autoattack
    return ThreatModel(norm="Linf", eps=eps, pgd_steps=cfg.pgd_steps,
                       pgd_step_size=cfg.pgd_step_size if cfg.pgd_step_size is not None else 2.5 * eps / cfg.pgd_steps,
                       pgd_restarts=cfg.pgd_restarts, autoattack=aa.version if aa.enabled else "off",
                       autoattack_apgd_steps=aa.apgd_steps, autoattack_fab_steps=aa.fab_steps,
                       autoattack_target_classes=target_classes(aa, num_classes),
                       autoattack_square_queries=aa.square_queries,
                       n_examples=n_examples, input_size="x".join(str(s) for s in input_shape))


def test_subset(test: Dataset, cfg: FinalEvalConfig) -> Dataset:
    """The first ``cfg.n_examples`` test examples (the test split's order is fixed), or all of them."""
    if cfg.n_examples is None or cfg.n_examples >= len(test):
        return test
    return Subset(test, range(cfg.n_examples))


def pgd_with_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, threat: ThreatModel,
                      generator: torch.Generator) -> torch.Tensor:
    """Per example (B,): correct clean (``clean``, (B,) bool) and still correct after every one of
    ``threat.pgd_restarts`` random-start PGD runs (x: (B, C, H, W) in [0, 1])."""
    robust = clean.clone()
    for _ in range(threat.pgd_restarts):
        robust &= ~pgd_broken(model, x, y, threat.eps, threat.pgd_step_size, threat.pgd_steps, True, generator)
    return robust


Outcomes = dict[str, dict[str, Any]]
"""The finished pieces of one evaluation: piece id -> what :meth:`FinalEvaluation.run` returned."""


def load_outcomes(path: Path | None, threat: ThreatModel) -> Outcomes:
    """The pieces finished before an interruption (none when ``path`` is None or missing).

    Raises:
        ValueError: the state was written for another threat model.
    """
    if path is None or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved["threat"] != asdict(threat):
        raise ValueError(f"evaluation state {path} was written for threat model {saved['threat']}, not "
                         f"{asdict(threat)}; delete it to start over")
    return saved["pieces"]


def save_outcomes(path: Path, threat: ThreatModel, outcomes: Outcomes) -> None:
    """Rewrite the state file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"threat": asdict(threat), "pieces": outcomes}))
    tmp.replace(path)


@dataclass(frozen=True)
class Piece:
    """An independent part of a final evaluation: a ``batch`` of test examples (clean, PGD with restarts,
    AutoAttack) or the ``check`` piece of a masking check that measures the model (:mod:`roli_sweep.evaluation.masking`)."""

    kind: str
    index: int | str

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.index}"


@dataclass
class FinalReport:
    """A final evaluation with its gradient-masking checks."""

    result: FinalEvalResult
    checks: list[Check]
    autoattack_stages: dict[str, int] | None = None
    """Examples each AutoAttack stage broke first (by name), and ``robust``: those none broke."""

    def record(self) -> FinalRecord:
        """The typed record Ray, JSON and MLflow carry: metrics, the threat model and the checks."""
        return FinalRecord(self.result.metrics(), self.result.threat, list(self.checks))


class FinalEvaluation:
    """The final evaluation of one trial config's model (``cfg.eval.final`` at the evaluation eps, fp32, eval
    mode) as independent :class:`Piece` s, so that a sweep runs them on every free CPU or GPU at once
    (:mod:`roli_sweep.tune.final_pool`) and ``train`` one after the other (:func:`evaluate_and_check`).

    Batch ``b`` seeds its PGD random starts and AutoAttack with ``seed + 3 + b``, so a piece gives the same
    outcome wherever and whenever it runs; the checks attack the first ``masking.n_examples`` of the
    examples evaluated.
    """

    def __init__(self, cfg: TrialConfig, test: Dataset, num_classes: int) -> None:
        self.final = cfg.eval.final
        self.eps = evaluation_attack(cfg.attack, cfg.eval).eps
        self.seed = cfg.seed + 3
        self.num_classes = num_classes
        self.subset = test_subset(test, self.final)
        self.threat = threat_model(self.final, self.eps, len(self.subset), tuple(self.subset[0][0].shape), num_classes)
        self.n_checked = min(self.final.masking.n_examples, len(self.subset))

    def pieces(self) -> list[Piece]:
        """The batches first (the long ones), then the check pieces."""
        batches = [Piece("batch", b) for b in range(math.ceil(len(self.subset) / self.final.batch_size))]
        checks = [Piece("check", name) for name in measured_checks(self.final.autoattack.enabled)]
        return batches + checks

    def _examples(self, indices: range, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.subset[i][0] for i in indices]).to(device)
        y = torch.stack([torch.as_tensor(self.subset[i][1]) for i in indices]).to(device)
        return x, y

    def run(self, piece: Piece, model: nn.Module, device: torch.device) -> dict[str, Any]:
        """One piece on ``model`` (images (B, C, H, W) in [0, 1] -> logits (B, K)), put in eval mode and restored
        after; plain data (JSON)."""
        was_training = model.training
        model.eval()
        try:
            if piece.kind == "check":
                x, y = self._examples(range(self.n_checked), device)
                return measure(str(piece.index), model, x, y, self.eps, self.final.masking, self.seed + 1)
            start = int(piece.index) * self.final.batch_size
            x, y = self._examples(range(start, min(start + self.final.batch_size, len(self.subset))), device)
            seed = self.seed + int(piece.index)
            with torch.no_grad():
                clean = model(x).argmax(1) == y
            robust = pgd_with_restarts(model, x, y, clean, self.threat, torch.Generator(device).manual_seed(seed))
            out = {"clean": clean.tolist(), "pgd": robust.tolist()}
            if self.final.autoattack.enabled:
                out["autoattack"] = autoattack_outcomes(model, x, y, clean, self.eps, self.num_classes,
                                                        self.final.autoattack, seed).tolist()
            return out
        finally:
            model.train(was_training)

    def report(self, outcomes: Outcomes) -> FinalReport:
        """Accuracies and every masking check's verdict from every piece's outcome.

        Raises:
            KeyError: a piece has no outcome yet.
        """
        batches = [outcomes[p.id] for p in self.pieces() if p.kind == "batch"]
        clean = [v for b in batches for v in b["clean"]]
        pgd_robust = [v for b in batches for v in b["pgd"]]
        stages, autoattack = None, None
        if self.final.autoattack.enabled:
            broken_by = [v for b in batches for v in b["autoattack"]]
            autoattack = [v == ROBUST for v in broken_by]
            stages = {name: broken_by.count(i) for i, name in enumerate(STAGES)}
            stages["robust"] = broken_by.count(ROBUST)
        result = FinalEvalResult(self.threat, clean, pgd_robust, autoattack)
        n = self.n_checked
        measured = {p.index: outcomes[p.id] for p in self.pieces() if p.kind == "check"}
        checks = judge(measured, Evidence(n, sum(clean[:n]) / n, sum(pgd_robust[:n]) / n,
                                          sum(autoattack[:n]) / n if autoattack is not None else None, stages,
                                          self.final.masking))
        return FinalReport(result, checks, stages)


def evaluate_and_check(model: nn.Module, test: Dataset, cfg: TrialConfig, num_classes: int, device: torch.device,
                       state_path: Path | None = None,
                       on_piece: Callable[[Piece, int, int], None] | None = None) -> FinalReport:
    """The whole :class:`FinalEvaluation` in this process, piece after piece: clean, PGD with restarts and
    AutoAttack on ``cfg.eval.final``'s examples, then the masking checks.

    Args:
        model: images (B, C, H, W) in [0, 1] -> logits (B, K).
        test: the test split; its first ``cfg.eval.final.n_examples`` are used when set.
        state_path: JSON file of finished pieces; read to resume, rewritten after every piece.
        on_piece: called as ``on_piece(piece, done, total)`` after each piece.

    Raises:
        ValueError: ``state_path`` holds a state for a different threat model.
    """
    evaluation = FinalEvaluation(cfg, test, num_classes)
    outcomes = load_outcomes(state_path, evaluation.threat)
    pieces = evaluation.pieces()
    for piece in pieces:
        if piece.id in outcomes:
            continue  # finished before an interruption
        outcomes[piece.id] = evaluation.run(piece, model, device)
        if state_path is not None:
            save_outcomes(state_path, evaluation.threat, outcomes)
        if on_piece is not None:
            on_piece(piece, sum(p.id in outcomes for p in pieces), len(pieces))
    return evaluation.report(outcomes)
