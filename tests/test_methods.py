"""Transfer methods: after training steps exactly the intended parameters have changed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roli_sweep.config import BackboneConfig
from roli_sweep.models.backbone import build_backbone
from roli_sweep.models.methods import METHODS, apply_method, trainable_parameter_count
from tests.conftest import TINY_KWARGS


def _intended(name: str, method: str) -> bool:
    """Which parameters each method is meant to train."""
    if name.startswith("net.head."):
        return True
    return {"linear": False, "full": True, "lora": "lora_" in name}[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_intended_parameters_change(method, tiny_weights):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS,
                                          weights=str(tiny_weights)), num_classes=4)
    params = METHODS[method].Params().model_dump()
    apply_method(model, method, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if _intended(n, method)}
    assert trainable_parameter_count(model) == sum(before[n].numel() for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(2):  # two steps: LoRA's A only gets a gradient once B has left zero
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_lora_starts_as_identity_with_random_a_and_zero_b(tiny_weights):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights))
    plain = build_backbone(cfg, num_classes=4).eval()
    torch.manual_seed(0)
    adapted = build_backbone(cfg, num_classes=4).eval()
    adapted.load_state_dict(plain.state_dict())
    apply_method(adapted, "lora", {"r": 4})
    a = [p for n, p in adapted.named_parameters() if "lora_A" in n]
    b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert a and all(p.abs().sum() > 0 for p in a)  # never both zero (the reference code's bug)
    assert b and all(p.abs().sum() == 0 for p in b)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted(x), atol=1e-6)
