"""PGD: inside the eps ball and [0, 1], stronger than clean, input gradients only, eval mode."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roli_sweep.core.attacks import pgd


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))


def test_pgd_stays_in_ball_and_box_and_raises_the_loss():
    model = _model().eval()
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    eps = 8 / 255
    x_adv = pgd(model, x, y, eps=eps, step_size=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.01


def test_pgd_keeps_the_worst_iterate_per_example():
    model = _model().eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    x_adv = pgd(model, x, y, eps=0.1, step_size=0.05, steps=5, random_init=False)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    # without random start the clean input is the first iterate, so no example can end below it
    assert (adv >= clean - 1e-6).all()


def test_pgd_touches_no_parameter_grad_and_restores_train_mode():
    model = _model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_pgd_is_deterministic_in_eval_mode_despite_dropout():
    model = _model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    a = pgd(model, x, y, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(1))
    b = pgd(model, x, y, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_zero_steps_is_clean_even_with_random_start():
    model = _model().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    assert torch.equal(pgd(model, x, y, eps=0.1, step_size=0.01, steps=0, random_init=True), x)


def test_evaluation_prefers_a_misclassified_iterate():
    model = _model().eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    g = torch.Generator().manual_seed(3)
    by_loss = pgd(model, x, y, 0.1, 0.02, 5, generator=g)
    g = torch.Generator().manual_seed(3)
    by_error = pgd(model, x, y, 0.1, 0.02, 5, generator=g, prefer_misclassified=True)
    with torch.no_grad():
        wrong_loss = (model(by_loss).argmax(1) != y)
        wrong_error = (model(by_error).argmax(1) != y)
    assert (wrong_error | ~wrong_loss).all(), "every example broken by the loss criterion stays broken"
    assert wrong_error.sum() >= wrong_loss.sum()


class WrongOnlyWhenClean(nn.Module):
    """Predicts the label 1 everywhere except exactly on the clean image ``x0``: wrong clean, right under attack."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = (x - self.x0).abs().flatten(1).sum(1)  # (B,)
        return torch.stack([torch.full_like(moved, 0.5), 1000 * moved], dim=1)  # (B, 2)


def test_robust_accuracy_counts_only_clean_correct_examples():
    from roli_sweep.config import AttackConfig
    from roli_sweep.core.train import Runtime, evaluate, make_loader

    x0 = torch.rand(1, 1, 8, 8)
    model = WrongOnlyWhenClean(x0)
    loader = make_loader(torch.utils.data.TensorDataset(x0, torch.tensor([1])), 1, False, 0, torch.device("cpu"))
    runtime = Runtime(torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x0).argmax(1).item() == 0 and model(x0 + 0.01).argmax(1).item() == 1
    clean, robust = evaluate(model, loader, AttackConfig(eps=0.1, steps=1, step_size=0.01), 1, runtime)
    assert (clean, robust) == (0.0, 0.0)


def test_validation_attacks_run_in_fp32_under_bf16_training():
    from roli_sweep.config import AttackConfig
    from roli_sweep.core.train import Runtime, evaluate, make_loader

    model = _model().eval()
    dtypes = []
    model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    runtime = Runtime(torch.device("cpu"), torch.Generator().manual_seed(0), torch.bfloat16)
    evaluate(model, make_loader(data, 8, False, 0, torch.device("cpu")), AttackConfig(eps=0.1, steps=2), 2, runtime)
    assert dtypes and set(dtypes) == {torch.float32}
