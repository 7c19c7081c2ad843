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

The checks that attack the model are measured in independent pieces (:data:`PIECES`, one Ray task each in
a sweep's final evaluation, :mod:`roli_sweep.final_eval`) that return plain numbers; :func:`judge` turns
the numbers into the verdicts.
"""
from __future__ import annotations

import torch
from torch import nn

from roli_sweep.attacks import pgd_broken
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


def measure_eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                      generator: torch.Generator) -> dict:
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


def measure_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                       generator: torch.Generator) -> dict:
    """PGD-``cfg.pgd_steps`` and PGD-``cfg.more_steps`` accuracy at ``eps``."""
    return {"few": _pgd_acc(model, x, y, eps, cfg.pgd_steps, generator),
            "many": _pgd_acc(model, x, y, eps, cfg.more_steps, generator)}


def measure_square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
                   seed: int) -> dict:
    """Robust accuracy under Square (``cfg.square_queries``; used when AutoAttack, which has its own, is off)."""
    import torchattacks

    square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries, n_restarts=1, p_init=0.8,
                                 resc_schedule=False, seed=seed)
    return {"square": _robust_acc(model, x, square(x, y), y)}


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


def measure_model(model: nn.Module, x: torch.Tensor) -> dict:
    """The checks that need no attack: ``gradients``, ``logits``, ``deterministic``, as ``(name, status, detail)``."""
    checks = (check_gradients(model, x), check_logits(model, x), check_deterministic(model, x))
    return {"checks": [(c.name, c.status, c.detail) for c in checks]}


PIECES = ("eps_sweep", "more_steps", "model", "square")
"""The measured pieces of the checks; ``square`` only when AutoAttack is off."""


def measure(piece: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: MaskingConfig,
            seed: int) -> dict:
    """One piece of :data:`PIECES` on images ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,), model in eval mode
    (restored after); plain numbers for :func:`judge`.

    Raises:
        ValueError: an unknown piece.
    """
    generator = torch.Generator(x.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if piece == "eps_sweep":
            return measure_eps_sweep(model, x, y, eps, cfg, generator)
        if piece == "more_steps":
            return measure_more_steps(model, x, y, eps, cfg, generator)
        if piece == "model":
            return measure_model(model, x)
        if piece == "square":
            return measure_square(model, x, y, eps, cfg, seed)
        raise ValueError(f"unknown masking-check piece {piece!r}; known: {PIECES}")
    finally:
        model.train(was_training)


def judge(measured: dict[str, dict], n: int, clean: float, pgd_acc: float, autoattack: float | None,
          autoattack_stages: dict[str, int] | None, cfg: MaskingConfig) -> list[Check]:
    """The seven checks from the measured pieces (``measured[piece]``) and the final evaluation's accuracies on
    the ``n`` checked examples; ``autoattack_stages`` counts, over every example AutoAttack attacked, those
    each stage broke (by :data:`roli_sweep.autoattack.STAGES` name) and those left ``robust``."""
    tol = _tolerance(cfg, n)
    aa = "n/a" if autoattack is None else f"{autoattack:.3f}"
    order_ok = pgd_acc <= clean + tol and (autoattack is None or autoattack <= pgd_acc + tol)
    checks = [Check("order", _status(order_ok), f"AutoAttack {aa} <= PGD {pgd_acc:.3f} <= clean {clean:.3f}")]

    sweep = measured["eps_sweep"]
    accs = sweep["accs"]
    monotone = all(b <= a + tol for a, b in zip(accs, accs[1:]))
    curve = ", ".join(f"{r:.3g}: {a:.3f}" for r, a in zip(sweep["radii"], accs))
    stopped = (f"; stopped at accuracy 0 before eps {', '.join(f'{r:.3g}' for r in sweep['all_radii'][len(accs):])}"
               if len(accs) < len(sweep["all_radii"]) else "")
    checks.append(Check("eps_sweep", _status(monotone and accs[-1] <= cfg.large_eps_max_acc),
                        f"PGD-{cfg.pgd_steps} accuracy by eps {{{curve}}}{stopped}; non-increasing: {monotone}; "
                        f"at eps {cfg.large_eps}: <= {cfg.large_eps_max_acc} required"))

    more = measured["more_steps"]
    checks.append(Check("more_steps", _status(more["many"] <= more["few"] + tol),
                        f"PGD-{cfg.pgd_steps} {more['few']:.3f}, PGD-{cfg.more_steps} {more['many']:.3f}"))

    if autoattack_stages is not None:
        attacked = sum(autoattack_stages.values())
        by_square, robust = autoattack_stages.get("Square", 0), autoattack_stages.get("robust", 0)
        white_box = by_square + robust
        ok = by_square <= _tolerance(cfg, attacked) * attacked
        checks.append(Check("black_box", _status(ok),
                            f"AutoAttack's Square broke {by_square} of the {white_box} examples APGD-CE, APGD-T and "
                            f"FAB-T left robust (of {attacked} attacked); allowed: "
                            f"{_tolerance(cfg, attacked) * attacked:.3g}"))
    else:
        square = measured["square"]["square"]
        checks.append(Check("black_box", _status(square >= pgd_acc - tol),
                            f"Square ({cfg.square_queries} queries) {square:.3f} vs PGD {pgd_acc:.3f}"))
    checks += [Check(*c) for c in measured["model"]["checks"]]
    return checks


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, clean: float, pgd_acc: float,
               autoattack: float | None, cfg: MaskingConfig, seed: int,
               autoattack_stages: dict[str, int] | None = None) -> list[Check]:
    """All seven checks on images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,), in one process.

    ``clean``, ``pgd_acc`` and ``autoattack`` are the final evaluation's accuracies (fractions) on ``x``;
    ``autoattack_stages`` as :func:`judge` takes it (None: Square is run here for ``black_box``).
    """
    pieces = [p for p in PIECES if p != "square" or autoattack_stages is None]
    measured = {piece: measure(piece, model, x, y, eps, cfg, seed) for piece in pieces}
    return judge(measured, len(y), clean, pgd_acc, autoattack, autoattack_stages, cfg)
