"""PGD under L-inf (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", 2018).

The threat model is kept apart from the loop, as in MadryLab robustness's ``attack_steps.py``:
:func:`project` and :func:`random_start` define the L-inf ball intersected with the image box
[0, 1]; :func:`pgd` iterates signed-gradient ascent steps on the cross-entropy loss.

Two choices differ from the RoLI reference code (../shared/PAPER.md):
- the worst iterate (highest loss) is kept **per example**, not per batch;
- gradients are taken w.r.t. the input only (``torch.autograd.grad``), so parameter ``.grad``
  buffers are never touched, and the model runs in eval mode (dropout, drop-path and LoRA /
  prompt dropout off) while the attack runs; its previous mode is restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x_adv`` into the L-inf ball of radius ``eps`` around ``x`` and into [0, 1]. Shapes (B, C, H, W)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of the L-inf ball around ``x`` (B, C, H, W), clipped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return project(x + (2.0 * noise - 1.0) * eps, x, eps)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model.eval()``, then restore the training flag of every submodule."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_init: bool = True,
    generator: torch.Generator | None = None,
    prefer_misclassified: bool = False,
) -> torch.Tensor:
    """L-inf PGD-``steps`` adversarial examples, worst iterate per example.

    Args:
        model: maps images (B, C, H, W) in [0, 1] to logits (B, K); normalisation is inside it.
        x: clean images (B, C, H, W), range [0, 1].
        y: labels (B,), int64.
        eps: L-inf radius in [0, 1] pixel units (e.g. 8/255).
        step_size: signed-gradient step in [0, 1] pixel units (e.g. 2/255).
        steps: number of ascent steps; 0 returns ``x`` unchanged (clean training / evaluation).
        random_init: start from a uniform point in the eps ball.
        generator: torch RNG for the random start (reproducible attacks).
        prefer_misclassified: for evaluation: an iterate that is misclassified beats any that is
            not, so robust accuracy counts an example as broken if any iterate broke it.

    Returns:
        Adversarial images (B, C, H, W), detached, with ``|x_adv - x|_inf <= eps`` and range [0, 1]:
        for each example the iterate with the highest cross-entropy among all visited (among the
        misclassified ones first, with ``prefer_misclassified``).
    """
    if steps == 0 or eps == 0:
        return x.detach().clone()  # no attack: clean images (no random start either)
    return _search(model, x, y, eps, step_size, steps, random_init, generator, prefer_misclassified)[0]


def pgd_broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
               random_init: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per example (B,) bool: some iterate of :func:`pgd` (``prefer_misclassified``) is misclassified.

    The same verdict as ``model(pgd(...)).argmax(1) != y``, without that extra forward pass: the attack
    already scored every iterate. Arguments as :func:`pgd`; with ``steps == 0`` it scores ``x`` itself.
    """
    return _search(model, x, y, eps, step_size, steps, random_init, generator, True)[1]


def _search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
            random_init: bool, generator: torch.Generator | None,
            prefer_misclassified: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pgd`'s loop: the chosen iterate per example (B, C, H, W) and whether any iterate was misclassified (B,)."""
    x = x.detach()
    if steps == 0 or eps == 0:
        steps, random_init = 0, False  # no attack: clean images (no random start either)
    x_adv = random_start(x, eps, generator) if random_init else x.clone()
    best = x_adv.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model), torch.enable_grad():
        for step in range(steps + 1):  # steps + 1 evaluations: the last one scores the final iterate
            x_adv.requires_grad_(steps > 0)
            logits = model(x_adv)  # (B, K)
            loss = F.cross_entropy(logits, y, reduction="none")  # (B,)
            improved = loss.detach() > best_loss
            if prefer_misclassified:
                wrong = logits.detach().argmax(1) != y
                improved = (wrong & ~best_wrong) | ((wrong == best_wrong) & improved)
                best_wrong |= wrong
            else:
                best_wrong |= logits.detach().argmax(1) != y
            best[improved] = x_adv.detach()[improved]
            best_loss = torch.where(improved, loss.detach(), best_loss)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)  # w.r.t. the input only
            x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return best, best_wrong
