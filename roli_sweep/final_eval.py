"""The final, reported evaluation of a trained model on the test split: clean, PGD with restarts, AutoAttack.

Validation accuracies select models; this is what gets reported (../shared/PAPER.md, "Checking
robustness claims"): clean accuracy, PGD-k with random restarts (an example counts as robust only if
it is classified correctly clean and no restart breaks it) and standard AutoAttack as published
(Croce & Hein, ICML 2020: APGD-CE, APGD-T, FAB-T, Square; :mod:`roli_sweep.autoattack`), on the full
test split or its first ``n_examples`` (a stated subset). The model runs in eval mode in fp32.

:func:`evaluate_and_check` adds the gradient-masking checks of :mod:`roli_sweep.masking`.

The per-example outcomes are written to a JSON state file after every batch, so an interrupted
AutoAttack run continues at the next batch; a state written for another threat model is refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from roli_sweep.attacks import pgd
from roli_sweep.autoattack import autoattack_robust, target_classes
from roli_sweep.config import FinalEvalConfig, TrialConfig, evaluation_attack
from roli_sweep.masking import Check, run_checks
from roli_sweep.train import Runtime, make_loader


@dataclass(frozen=True)
class ThreatModel:
    """Everything a reported robust accuracy depends on; logged as params next to it."""

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
        out = {}
        for key, value in asdict(self).items():
            key = "autoattack.version" if key == "autoattack" else key.replace("autoattack_", "autoattack.")
            out[f"final_eval.{key}"] = str(value)
        return out


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
        x_adv = pgd(model, x, y, threat.eps, threat.pgd_step_size, threat.pgd_steps, True, generator,
                    prefer_misclassified=True)
        with torch.no_grad():
            robust &= model(x_adv).argmax(1) == y
    return robust


def _load_outcomes(path: Path | None, threat: ThreatModel) -> dict[str, list[bool]]:
    empty = {"clean": [], "pgd": [], "autoattack": []}
    if path is None or not path.is_file():
        return empty
    saved = json.loads(path.read_text())
    if saved["threat"] != asdict(threat):
        raise ValueError(f"evaluation state {path} was written for threat model {saved['threat']}, not "
                         f"{asdict(threat)}; delete it to start over")
    return saved["outcomes"]


def final_evaluate(model: nn.Module, test: Dataset, cfg: FinalEvalConfig, eps: float, num_classes: int,
                   runtime: Runtime, seed: int, state_path: Path | None = None,
                   on_batch: Callable[[int, int], None] | None = None) -> FinalEvalResult:
    """Clean, PGD-with-restarts and AutoAttack accuracy of ``model`` on (a stated subset of) ``test``.

    Args:
        model: images (B, C, H, W) in [0, 1] -> logits (B, K); put in eval mode here.
        test: the test split; its first ``cfg.n_examples`` are used when set.
        eps: the L-inf radius in [0, 1] pixel units.
        runtime: device (the evaluation itself is fp32, whatever ``runtime.autocast_dtype`` says).
        seed: seeds the PGD random starts and AutoAttack.
        state_path: JSON file of finished batches; read to resume, rewritten after every batch.
        on_batch: called as ``on_batch(done_examples, total_examples)``.

    Raises:
        ValueError: ``state_path`` holds a state for a different threat model.
    """
    subset = test_subset(test, cfg)
    threat = threat_model(cfg, eps, len(subset), tuple(subset[0][0].shape), num_classes)
    outcomes = _load_outcomes(state_path, threat)
    generator = torch.Generator(runtime.device).manual_seed(seed)
    loader = make_loader(subset, cfg.batch_size, shuffle=False, seed=seed, device=runtime.device)
    was_training = model.training
    model.eval()
    for batch, (x, y) in enumerate(loader):
        start = batch * cfg.batch_size
        if start + len(y) <= len(outcomes["clean"]):
            continue  # finished before an interruption
        generator.manual_seed(seed + batch)  # a resumed batch sees the same random starts
        x, y = x.to(runtime.device), y.to(runtime.device)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        robust = pgd_with_restarts(model, x, y, clean, threat, generator)
        outcomes["clean"] += clean.tolist()
        outcomes["pgd"] += robust.tolist()
        if cfg.autoattack.enabled:
            outcomes["autoattack"] += autoattack_robust(model, x, y, clean, eps, num_classes, cfg.autoattack,
                                                        seed + batch).tolist()
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"threat": asdict(threat), "outcomes": outcomes}))
            tmp.replace(state_path)
        if on_batch is not None:
            on_batch(len(outcomes["clean"]), len(subset))
    model.train(was_training)
    return FinalEvalResult(threat, outcomes["clean"], outcomes["pgd"],
                           outcomes["autoattack"] if cfg.autoattack.enabled else None)


@dataclass
class FinalReport:
    """A final evaluation with its gradient-masking checks."""

    result: FinalEvalResult
    checks: list[Check]

    def record(self) -> dict[str, Any]:
        """Plain data for Ray, JSON and MLflow: ``metrics``, ``params`` (the threat model) and ``checks``
        as ``(name, status, detail)``, as :func:`roli_sweep.tracking.final_eval_record` logs them."""
        return {"metrics": self.result.metrics(), "params": self.result.threat.params(),
                "checks": [(c.name, c.status, c.detail) for c in self.checks]}


def evaluate_and_check(model: nn.Module, test: Dataset, cfg: TrialConfig, num_classes: int, device: torch.device,
                       state_path: Path | None = None,
                       on_batch: Callable[[int, int], None] | None = None) -> FinalReport:
    """The final evaluation of ``cfg.eval.final`` at the evaluation eps, then the masking checks on the
    first ``cfg.eval.final.masking.n_examples`` of the examples evaluated (fp32, eval mode).

    Raises:
        ValueError: ``state_path`` holds a state for a different threat model.
    """
    final = cfg.eval.final
    eps = evaluation_attack(cfg.attack, cfg.eval).eps
    runtime = Runtime(device, torch.Generator(device).manual_seed(cfg.seed + 3))
    result = final_evaluate(model, test, final, eps, num_classes, runtime, cfg.seed + 3, state_path, on_batch)
    n = min(final.masking.n_examples, len(result.clean))
    subset = test_subset(test, final)
    x = torch.stack([subset[i][0] for i in range(n)]).to(device)
    y = torch.stack([torch.as_tensor(subset[i][1]) for i in range(n)]).to(device)
    aa = sum(result.autoattack[:n]) / n if result.autoattack is not None else None
    checks = run_checks(model, x, y, eps, sum(result.clean[:n]) / n, sum(result.pgd[:n]) / n, aa, final.masking,
                        cfg.seed + 4)
    return FinalReport(result, checks)
