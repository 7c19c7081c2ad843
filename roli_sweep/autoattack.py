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
(:class:`roli_sweep.config.AutoAttackConfig`, defaults = the published values) and chained with
torchattacks' ``MultiAttack``, which attacks only the examples still robust. With fewer than 10
classes the targeted attacks use every other class (``K - 1`` targets), as the reference does.
A configuration that differs from the published one is labelled ``custom``, never ``standard``.
"""
from __future__ import annotations

import torch
from torch import nn

from roli_sweep.attacks import eval_mode
from roli_sweep.config import AutoAttackConfig


def target_classes(cfg: AutoAttackConfig, num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T: ``cfg.target_classes`` (9 published), at most ``num_classes - 1``."""
    return max(1, min(cfg.target_classes, num_classes - 1))


def build_autoattack(model: nn.Module, eps: float, num_classes: int, cfg: AutoAttackConfig, seed: int):
    """The four attacks of :mod:`roli_sweep.autoattack`, configured as ``cfg`` says, chained by ``MultiAttack``.

    Args:
        model: images (B, C, H, W) in [0, 1] -> logits (B, K); normalisation inside it.
        eps: L-inf radius in [0, 1] pixel units (e.g. 8/255).
        num_classes: K, the model's number of classes.
        seed: the random starts of every component.

    Returns:
        A ``torchattacks.MultiAttack`` whose ``attacks`` are APGD-CE, APGD-T, FAB-T and Square.
    """
    import torchattacks

    targets = target_classes(cfg, num_classes)
    # torchattacks' targeted attacks run n_classes - 1 targets, so n_classes = targets + 1 sets the count
    attacks = [
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=cfg.apgd_steps, n_restarts=1, seed=seed,
                          loss="ce", eot_iter=1, rho=0.75),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=cfg.apgd_steps, n_restarts=1, seed=seed,
                           eot_iter=1, rho=0.75, n_classes=targets + 1),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=cfg.fab_steps, n_restarts=1, seed=seed,
                         multi_targeted=True, n_classes=targets + 1),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries, n_restarts=1, p_init=0.8,
                            loss="margin", resc_schedule=False, seed=seed),
    ]
    return torchattacks.MultiAttack(attacks)


def autoattack_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
                      num_classes: int, cfg: AutoAttackConfig, seed: int) -> torch.Tensor:
    """Per example (B,): classified correctly clean and still correctly after every AutoAttack component.

    Args:
        x: images (B, C, H, W) in [0, 1]; y: labels (B,); clean: (B,) bool, ``model(x)`` correct.

    Only the clean-correct examples are attacked (the reference drops the others first). The model
    runs in eval mode, every submodule's mode is restored afterwards, and the global RNG is left as
    it was (torchattacks' components reseed it).
    """
    robust = clean.clone()
    attacked = robust.nonzero().squeeze(1)
    if len(attacked):
        with eval_mode(model), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            x_adv = build_autoattack(model, eps, num_classes, cfg, seed)(x[attacked], y[attacked])
            with torch.no_grad():
                robust[attacked] = model(x_adv).argmax(1) == y[attacked]
    return robust
