"""Gradient-masking checks, run with every final evaluation (../shared/PAPER.md, "Checking robustness claims").

A robust accuracy is suspect when the attacks were not able to use the model's gradients
(Athalye et al., ICML 2018; Carlini et al., "On Evaluating Adversarial Robustness", 2019). Each
check returns ``pass`` or ``warning`` with the numbers behind it:

- ``order``: AutoAttack <= PGD <= clean accuracy;
- ``eps_sweep``: PGD accuracy does not rise as eps grows and is ~0 at a large eps;
- ``more_steps``: PGD with many more steps is not more accurate;
- ``black_box``: Square (black-box) does not break examples the white-box attacks left robust. With
  AutoAttack on, this reads AutoAttack's own Square stage, as the official AutoAttack flags it
  (fra31/auto-attack ``checks.check_square_sr``), instead of running Square again; with it off, a
  separate Square run (``square_queries``) is compared with PGD;
- ``gradients``: every example has a non-zero, finite input gradient (of the logit margin, which
  does not saturate the way cross-entropy does on confident examples);
- ``logits``: the outputs are logits, not probabilities (rows in [0, 1] summing to 1), which
  AutoAttack also flags;
- ``deterministic``: two eval-mode forward passes of one batch give identical logits.

Robust accuracies count an example only when it is classified correctly clean as well.

"Beyond noise" is a tolerance of ``tolerance`` (a fraction of the checked examples, at least one).

Each check is one class registered in :data:`CHECKS` (:func:`register_check`): a new check is one class here
(and its settings in :class:`roli_sweep.config.MaskingConfig`), nothing else. The checks that measure the
model do so in independent pieces (one Ray task each in a sweep's final evaluation,
:mod:`roli_sweep.evaluation.final_eval`) that return plain numbers; each check's ``judge`` turns them into its verdict.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from roli_sweep.core.attacks import pgd_broken
from roli_sweep.config import MaskingConfig
from roli_sweep.records import Check


def _status(ok: bool) -> str:
    return "pass" if ok else "warning"


def _robust_acc(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples classified correctly both clean and on their adversarial example."""
    with torch.no_grad():
        return ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean().item()


def _pgd_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             generator: torch.Generator) -> float:
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    return (clean & ~pgd_broken(model, x, y, eps, 2.5 * eps / steps, steps, True, generator)).float().mean().item()


def _tolerance(cfg: MaskingConfig, n: int) -> float:
    return max(cfg.tolerance, 1.0 / max(n, 1))


@dataclass
class Evidence:
    """What the checks judge besides their own measurements: the final evaluation's accuracies (fractions) on
    the ``n`` checked examples, and ``autoattack_stages``: over every example AutoAttack attacked, those each
    stage broke first (by :data:`roli_sweep.evaluation.autoattack.STAGES` name) and those left ``robust`` (None when
    AutoAttack is off)."""

    n: int
    clean: float
    pgd_acc: float
    autoattack: float | None
    autoattack_stages: dict[str, int] | None
    cfg: MaskingConfig

    @property
    def tol(self) -> float:
        return _tolerance(self.cfg, self.n)


class MaskingCheck(ABC):
    """One gradient-masking check: its ``name``, whether it measures something on the model (one independent
    piece of the final evaluation), what it measures, and its verdict."""

    name: ClassVar[str]

    def measures(self, autoattack: bool) -> bool:
        """Whether this check has a piece to run when AutoAttack is on (``autoattack``) or off."""
        return True

    def measure(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                generator: torch.Generator, seed: int) -> dict:
        """Plain numbers (JSON) for :meth:`judge`, on images ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,),
        the model in eval mode."""
        return {}

    @abstractmethod
    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        """The verdict from this check's measurement (None when it measures nothing) and the evidence."""


CHECKS: dict[str, MaskingCheck] = {}
"""Every check by name, in the order they are reported."""


def register_check(cls: type[MaskingCheck]) -> type[MaskingCheck]:
    """Class decorator: register one instance of a check under ``cls.name``.

    Raises:
        ValueError: the name is registered already.
    """
    if cls.name in CHECKS:
        raise ValueError(f"masking check {cls.name!r} is registered already")
    CHECKS[cls.name] = cls()
    return cls


@register_check
class Order(MaskingCheck):
    """AutoAttack <= PGD <= clean accuracy (beyond noise)."""

    name = "order"

    def measures(self, autoattack: bool) -> bool:
        return False

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        e = evidence
        aa = "n/a" if e.autoattack is None else f"{e.autoattack:.3f}"
        ok = e.pgd_acc <= e.clean + e.tol and (e.autoattack is None or e.autoattack <= e.pgd_acc + e.tol)
        return Check(self.name, _status(ok), f"AutoAttack {aa} <= PGD {e.pgd_acc:.3f} <= clean {e.clean:.3f}")


@register_check
class EpsSweep(MaskingCheck):
    """PGD accuracy does not rise as eps grows and is ~0 at a large eps."""

    name = "eps_sweep"

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        """PGD-``cfg.pgd_steps`` accuracy at each radius of the sweep, smallest first; it stops once accuracy is 0
        (a larger radius cannot raise it above 0 without failing the check anyway, and the remaining PGD runs
        would change no verdict)."""
        radii = sorted({eps * f for f in cfg.eps_factors} | {cfg.large_eps})
        accs = []
        for radius in radii:
            accs.append(_pgd_acc(model, x, y, radius, cfg.pgd_steps, generator))
            if accs[-1] == 0.0:
                break
        return {"radii": radii[:len(accs)], "accs": accs, "all_radii": radii}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        cfg, accs = evidence.cfg, measured["accs"]
        monotone = all(b <= a + evidence.tol for a, b in zip(accs, accs[1:]))
        curve = ", ".join(f"{r:.3g}: {a:.3f}" for r, a in zip(measured["radii"], accs))
        rest = measured["all_radii"][len(accs):]
        stopped = f"; stopped at accuracy 0 before eps {', '.join(f'{r:.3g}' for r in rest)}" if rest else ""
        return Check(self.name, _status(monotone and accs[-1] <= cfg.large_eps_max_acc),
                     f"PGD-{cfg.pgd_steps} accuracy by eps {{{curve}}}{stopped}; non-increasing: {monotone}; "
                     f"at eps {cfg.large_eps}: <= {cfg.large_eps_max_acc} required")


@register_check
class MoreSteps(MaskingCheck):
    """PGD with many more steps is not more accurate (beyond noise)."""

    name = "more_steps"

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        """PGD-``cfg.pgd_steps`` and PGD-``cfg.more_steps`` accuracy at ``eps``."""
        return {"few": _pgd_acc(model, x, y, eps, cfg.pgd_steps, generator),
                "many": _pgd_acc(model, x, y, eps, cfg.more_steps, generator)}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        cfg = evidence.cfg
        return Check(self.name, _status(measured["many"] <= measured["few"] + evidence.tol),
                     f"PGD-{cfg.pgd_steps} {measured['few']:.3f}, PGD-{cfg.more_steps} {measured['many']:.3f}")


@register_check
class BlackBox(MaskingCheck):
    """Square (black-box) does not break examples the white-box attacks left robust: AutoAttack's own Square
    stage when AutoAttack is on (fra31/auto-attack ``checks.check_square_sr``), else a Square run of its own."""

    name = "black_box"

    def measures(self, autoattack: bool) -> bool:
        return not autoattack

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        """Robust accuracy under Square (``cfg.square_queries``)."""
        import torchattacks

        square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries, n_restarts=1,
                                     p_init=0.8, resc_schedule=False, seed=seed)
        return {"square": _robust_acc(model, x, square(x, y), y)}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        cfg, stages = evidence.cfg, evidence.autoattack_stages
        if stages is None:
            square = measured["square"]
            return Check(self.name, _status(square >= evidence.pgd_acc - evidence.tol),
                         f"Square ({cfg.square_queries} queries) {square:.3f} vs PGD {evidence.pgd_acc:.3f}")
        attacked = sum(stages.values())
        by_square, robust = stages.get("Square", 0), stages.get("robust", 0)
        allowed = _tolerance(cfg, attacked) * attacked
        return Check(self.name, _status(by_square <= allowed),
                     f"AutoAttack's Square broke {by_square} of the {by_square + robust} examples APGD-CE, APGD-T "
                     f"and FAB-T left robust (of {attacked} attacked); allowed: {allowed:.3g}")


@register_check
class Gradients(MaskingCheck):
    """Every example has a non-zero, finite input gradient (of the logit margin, which does not saturate the
    way cross-entropy does on confident examples)."""

    name = "gradients"

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            top2 = model(x).topk(2, dim=1).values
            (grad,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), x)
        per_example = grad.flatten(1).abs().sum(1)
        return {"finite": bool(torch.isfinite(per_example).all()), "nonzero": (per_example > 0).float().mean().item()}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        finite, nonzero = measured["finite"], measured["nonzero"]
        return Check(self.name, _status(finite and nonzero == 1.0),
                     f"{100 * nonzero:.1f} % of examples have a non-zero input gradient; finite: {finite}")


@register_check
class Logits(MaskingCheck):
    """The outputs are logits, not probabilities (all in [0, 1], rows summing to 1), which saturate the attacks'
    losses; AutoAttack flags the same (fra31/auto-attack ``checks.check_range_output``)."""

    name = "logits"
    alpha = 1e-5

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        with torch.no_grad():
            out = model(x)
        sums = out.sum(-1)
        return {"min": out.min().item(), "max": out.max().item(), "sum_min": sums.min().item(),
                "sum_max": sums.max().item(), "rows_sum_to_one": bool(((sums - 1).abs() < self.alpha).all())}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        m = measured
        probabilities = m["max"] < 1 + self.alpha and m["min"] > -self.alpha and m["rows_sum_to_one"]
        return Check(self.name, _status(not probabilities),
                     f"outputs in [{m['min']:.3g}, {m['max']:.3g}], row sums [{m['sum_min']:.3g}, {m['sum_max']:.3g}]; "
                     f"probabilities rather than logits: {probabilities}")


@register_check
class Deterministic(MaskingCheck):
    """Two eval-mode forward passes of one batch give identical logits."""

    name = "deterministic"

    def measure(self, model, x, y, eps, cfg, generator, seed) -> dict:
        with torch.no_grad():
            first, second = model(x), model(x)
        return {"same": torch.equal(first, second), "max_diff": (first - second).abs().max().item()}

    def judge(self, measured: dict | None, evidence: Evidence) -> Check:
        return Check(self.name, _status(measured["same"]),
                     f"two eval-mode passes: max |logit difference| {measured['max_diff']:.3g}")


def measured_checks(autoattack: bool) -> list[str]:
    """The names of the checks that measure a piece on the model, AutoAttack on (``autoattack``) or off."""
    return [name for name, check in CHECKS.items() if check.measures(autoattack)]


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
            seed: int) -> dict:
    """The piece of check ``name`` on images ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,), the model in eval
    mode (restored after); plain numbers for :func:`judge`.

    Raises:
        ValueError: an unknown check.
    """
    if name not in CHECKS:
        raise ValueError(f"unknown masking check {name!r}; known: {sorted(CHECKS)}")
    generator = torch.Generator(x.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return CHECKS[name].measure(model, x, y, eps, cfg, generator, seed)
    finally:
        model.train(was_training)


def judge(measured: dict[str, dict], evidence: Evidence) -> list[Check]:
    """Every registered check's verdict, from the measured pieces (``measured[name]``) and the evidence."""
    return [check.judge(measured.get(name), evidence) for name, check in CHECKS.items()]


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, clean: float, pgd_acc: float,
               autoattack: float | None, cfg: MaskingConfig, seed: int,
               autoattack_stages: dict[str, int] | None = None) -> list[Check]:
    """Every check on images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,), in one process.

    ``clean``, ``pgd_acc`` and ``autoattack`` are the final evaluation's accuracies (fractions) on ``x``;
    ``autoattack_stages`` as :class:`Evidence` takes it (None: Square is run here for ``black_box``).
    """
    measured = {name: measure(name, model, x, y, eps, cfg, seed) for name in measured_checks(autoattack_stages is not None)}
    return judge(measured, Evidence(len(y), clean, pgd_acc, autoattack, autoattack_stages, cfg))
