"""Gradient-masking checks, run with every final evaluation (../shared/PAPER.md, "Checking robustness claims").

A robust accuracy is suspect when the attacks were not able to use the model's gradients
(Athalye et al., ICML 2018; Carlini et al., "On Evaluating Adversarial Robustness", 2019). Each
check returns ``pass`` or ``warning`` with the numbers behind it:

- ``order``: AutoAttack <= PGD <= clean accuracy;
- ``eps_sweep``: PGD accuracy does not rise as eps grows and is ~0 at a large eps;
- ``more_steps``: PGD with many more steps is not more accurate;
- ``black_box``: Square (black-box, torchattacks) does not beat the white-box attacks;
- ``gradients``: every example has a non-zero, finite input gradient (of the logit margin, which
  does not saturate the way cross-entropy does on confident examples);
- ``logits``: the outputs are logits, not probabilities (rows in [0, 1] summing to 1), which
  AutoAttack also flags;
- ``deterministic``: two eval-mode forward passes of one batch give identical logits.

Robust accuracies count an example only when it is classified correctly clean as well.

"Beyond noise" is a tolerance of ``tolerance`` (a fraction of the checked examples, at least one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from roli_sweep.attacks import pgd
from roli_sweep.config import MaskingConfig


@dataclass
class Check:
    """One check's outcome: ``status`` is ``pass`` or ``warning``; ``detail`` gives the numbers."""

    name: str
    status: str
    detail: str


def _status(ok: bool) -> str:
    return "pass" if ok else "warning"


def _robust_acc(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples classified correctly both clean and on their adversarial example."""
    with torch.no_grad():
        return ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean().item()


def _pgd_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             generator: torch.Generator) -> float:
    x_adv = pgd(model, x, y, eps, 2.5 * eps / steps, steps, True, generator, prefer_misclassified=True)
    return _robust_acc(model, x, x_adv, y)


def check_order(clean: float, pgd_acc: float, autoattack: float | None, tol: float) -> Check:
    ok = pgd_acc <= clean + tol and (autoattack is None or autoattack <= pgd_acc + tol)
    aa = "n/a" if autoattack is None else f"{autoattack:.3f}"
    return Check("order", _status(ok), f"AutoAttack {aa} <= PGD {pgd_acc:.3f} <= clean {clean:.3f}")


def check_eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                    generator: torch.Generator, tol: float) -> Check:
    radii = sorted({eps * f for f in cfg.eps_factors} | {cfg.large_eps})
    accs = [_pgd_acc(model, x, y, r, cfg.pgd_steps, generator) for r in radii]
    monotone = all(b <= a + tol for a, b in zip(accs, accs[1:]))
    ok = monotone and accs[-1] <= cfg.large_eps_max_acc
    curve = ", ".join(f"{r:.3g}: {a:.3f}" for r, a in zip(radii, accs))
    return Check("eps_sweep", _status(ok), f"PGD-{cfg.pgd_steps} accuracy by eps {{{curve}}}; "
                 f"non-increasing: {monotone}; at eps {cfg.large_eps}: <= {cfg.large_eps_max_acc} required")


def check_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                     generator: torch.Generator, tol: float) -> Check:
    few = _pgd_acc(model, x, y, eps, cfg.pgd_steps, generator)
    many = _pgd_acc(model, x, y, eps, cfg.more_steps, generator)
    return Check("more_steps", _status(many <= few + tol), f"PGD-{cfg.pgd_steps} {few:.3f}, PGD-{cfg.more_steps} {many:.3f}")


def check_black_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, white_box: float,
                    cfg: MaskingConfig, seed: int, tol: float) -> Check:
    import torchattacks

    square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries, n_restarts=1, p_init=0.8,
                                 resc_schedule=False, seed=seed)
    acc = _robust_acc(model, x, square(x, y), y)
    return Check("black_box", _status(acc >= white_box - tol),
                 f"Square ({cfg.square_queries} queries) {acc:.3f} vs white-box {white_box:.3f}")


def check_gradients(model: nn.Module, x: torch.Tensor) -> Check:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        top2 = logits.topk(2, dim=1).values
        (grad,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), x)
    per_example = grad.flatten(1).abs().sum(1)
    finite = bool(torch.isfinite(per_example).all())
    nonzero = (per_example > 0).float().mean().item()
    return Check("gradients", _status(finite and nonzero == 1.0),
                 f"{100 * nonzero:.1f} % of examples have a non-zero input gradient; finite: {finite}")


def check_logits(model: nn.Module, x: torch.Tensor, alpha: float = 1e-5) -> Check:
    """Outputs that are a probability distribution (all in [0, 1], rows summing to 1) instead of logits
    saturate the attacks' losses; AutoAttack flags the same (fra31/auto-attack ``checks.check_range_output``)."""
    with torch.no_grad():
        out = model(x)
    probabilities = bool(out.max() < 1 + alpha and out.min() > -alpha and ((out.sum(-1) - 1).abs() < alpha).all())
    return Check("logits", _status(not probabilities),
                 f"outputs in [{out.min().item():.3g}, {out.max().item():.3g}], row sums "
                 f"[{out.sum(-1).min().item():.3g}, {out.sum(-1).max().item():.3g}]; "
                 f"probabilities rather than logits: {probabilities}")


def check_deterministic(model: nn.Module, x: torch.Tensor) -> Check:
    with torch.no_grad():
        first, second = model(x), model(x)
    same = torch.equal(first, second)
    return Check("deterministic", _status(same),
                 f"two eval-mode passes: max |logit difference| {(first - second).abs().max().item():.3g}")


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, clean: float, pgd_acc: float,
               autoattack: float | None, cfg: MaskingConfig, seed: int) -> list[Check]:
    """All seven checks on images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,), model in eval mode.

    ``clean``, ``pgd_acc`` and ``autoattack`` are the final evaluation's accuracies (fractions); the
    other checks attack ``x`` themselves (typically the first ``cfg.n_examples`` test examples).
    """
    was_training = model.training
    model.eval()
    tol = max(cfg.tolerance, 1.0 / len(y))
    generator = torch.Generator(x.device).manual_seed(seed)
    white_box = min(pgd_acc, autoattack) if autoattack is not None else pgd_acc
    checks = [
        check_order(clean, pgd_acc, autoattack, tol),
        check_eps_sweep(model, x, y, eps, cfg, generator, tol),
        check_more_steps(model, x, y, eps, cfg, generator, tol),
        check_black_box(model, x, y, eps, white_box, cfg, seed, tol),
        check_gradients(model, x),
        check_logits(model, x),
        check_deterministic(model, x),
    ]
    model.train(was_training)
    return checks


def masking_tags(checks: list[Check]) -> dict[str, str]:
    """MLflow tags: ``masking`` (pass only if every check passed), ``masking.<check>`` and its detail."""
    tags = {"masking": "pass" if all(c.status == "pass" for c in checks) else "warning"}
    for c in checks:
        tags[f"masking.{c.name}"] = c.status
        tags[f"masking.{c.name}.detail"] = c.detail[:5000]
    return tags
