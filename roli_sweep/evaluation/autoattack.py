"""Standard AutoAttack as published (Croce & Hein, ICML 2020), built from torchattacks' components.

The published standard version (fra31/auto-attack, ``AutoAttack(version='standard')``) runs, in this
order, each attack only on the points every earlier attack left robust, starting from the points
classified correctly clean:

1. APGD-CE: 100 iterations, 1 restart (cross-entropy loss, rho 0.75);
2. APGD-T: 100 iterations, 9 target classes (targeted DLR loss), 1 restart;
3. FAB-T: 100 iterations, 9 target classes, 1 restart;
4. Square: 5000 queries, p_init 0.8, 1 restart, without the rescaled schedule (``resc_schedule=False``).

torchattacks 3.3's own ``AutoAttack(version='standard')`` keeps its components' default 10 steps and
``n_classes - 1`` target classes, and its ``Square`` defaults to the rescaled schedule, so it is a
weaker attack than the published one. Here each component is configured explicitly
(:class:`roli_sweep.config.AutoAttackConfig`, defaults = the published values) and chained as
``MultiAttack`` chains them, each attacking only the examples still robust, recording which one broke
each example. With fewer than 10
classes the targeted attacks use every other class (``K - 1`` targets), as the reference does.
A configuration that differs from the published one is labelled ``custom``, never ``standard``.
"""
from __future__ import annotations

import torch
from torch import nn

from roli_sweep.core.attacks import eval_mode
from roli_sweep.config import AutoAttackConfig


def target_classes(cfg: AutoAttackConfig, num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T: ``cfg.target_classes`` (9 published), at most ``num_classes - 1``."""
    return max(1, min(cfg.target_classes, num_classes - 1))


STAGES = ("APGD-CE", "APGD-T", "FAB-T", "Square")
"""AutoAttack's components in the published order."""
ROBUST, MISCLASSIFIED = -1, -2
"""Outcomes of :func:`autoattack_outcomes` besides a stage index."""


def build_autoattack(model: nn.Module, eps: float, num_classes: int, cfg: AutoAttackConfig, seed: int) -> list:
    """The four attacks of :mod:`roli_sweep.evaluation.autoattack`, configured as ``cfg`` says, in the published order.

    Args:
        model: images (B, C, H, W) in [0, 1] -> logits (B, K); normalisation inside it.
        eps: L-inf radius in [0, 1] pixel units (e.g. 8/255).
        num_classes: K, the model's number of classes.
        seed: the random starts of every component.

    Returns:
        torchattacks' APGD-CE, APGD-T, FAB-T and Square (:data:`STAGES`).
    """
    import torchattacks

    targets = target_classes(cfg, num_classes)
    # torchattacks' targeted attacks run n_classes - 1 targets, so n_classes = targets + 1 sets the count
    return [
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=cfg.apgd_steps, n_restarts=1, seed=seed,
                          loss="ce", eot_iter=1, rho=0.75),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=cfg.apgd_steps, n_restarts=1, seed=seed,
                           eot_iter=1, rho=0.75, n_classes=targets + 1),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=cfg.fab_steps, n_restarts=1, seed=seed,
                         multi_targeted=True, n_classes=targets + 1),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries, n_restarts=1, p_init=0.8,
                            loss="margin", resc_schedule=False, seed=seed),
    ]


def autoattack_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
                        num_classes: int, cfg: AutoAttackConfig, seed: int) -> torch.Tensor:
    """Per example (B,), int64: :data:`MISCLASSIFIED` when ``model(x)`` is wrong (never attacked), :data:`ROBUST`
    when every component left it correctly classified, else the index in :data:`STAGES` of the first
    component that broke it.

    Args:
        x: images (B, C, H, W) in [0, 1]; y: labels (B,); clean: (B,) bool, ``model(x)`` correct.

    Each component attacks only the examples all earlier ones left robust, starting from the
    clean-correct ones, as the reference does (torchattacks' ``MultiAttack`` chains the same way but
    does not say which attack broke what; the per-stage counts are what AutoAttack's own log prints and
    what its Square check reads). The model runs in eval mode, every submodule's mode is restored
    afterwards, and the global RNG is left as it was (the components reseed it).
    """
    broken_by = torch.where(clean, ROBUST, MISCLASSIFIED).to(torch.int64)
    with eval_mode(model), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for stage, attack in enumerate(build_autoattack(model, eps, num_classes, cfg, seed)):
            left = (broken_by == ROBUST).nonzero().squeeze(1)
            if not len(left):
                break
            x_adv = attack(x[left], y[left])
            with torch.no_grad():
                wrong = model(x_adv).argmax(1) != y[left]
            broken_by[left[wrong]] = stage
    return broken_by
