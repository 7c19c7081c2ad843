"""Every paper preset loads, builds its model (random weights) and takes one adversarial step.

The presets' checkpoints are the users' files, so ``backbone.weights`` is set to None here; all else
is validated exactly as shipped, so no preset can rot.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from roli_sweep.attacks import pgd
from roli_sweep.config import BackboneConfig, parse_search_space
from roli_sweep.models.backbone import build_backbone
from roli_sweep.models.methods import apply_method
from roli_sweep.train import make_optimizer

PAPER = Path(__file__).resolve().parent.parent / "search_spaces" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))
CLASSES = {"cifar10": 10, "cifar100": 100, "caltech256": 257, "cub200": 200, "stanford_dogs": 120}
EPOCHS = {"cifar10": 20, "cifar100": 20, "caltech256": 40, "cub200": 60, "stanford_dogs": 40}
REFERENCE_LR = {"linear": [0.05], "full": [5e-4, 1e-4], "lora": [1e-2, 1e-3], "adapter": [5e-2],
                "prompt": [0.5], "bias": [5e-3]}  # CIFAR-10, RanLI and RoLI (shared/PAPER.md)


def test_a_preset_for_every_dataset_and_method():
    assert {p.stem for p in PRESETS} == {f"{d}_{m}" for d in CLASSES for m in REFERENCE_LR}


@lru_cache(maxsize=None)
def _backbone(backbone_json: str, num_classes: int):
    return build_backbone(BackboneConfig.model_validate_json(backbone_json), num_classes)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_builds_and_steps(path):
    tree = yaml.safe_load(path.read_text())
    tree["base"]["backbone"]["weights"] = None
    tree.setdefault("name", path.stem)
    space = parse_search_space(tree, str(path))
    cfg = space.base
    dataset, method = cfg.data.name, cfg.finetune.method
    assert path.stem == f"{dataset}_{method}"
    # the reference setting
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.steps == 7
    assert cfg.attack.step_size == pytest.approx(2 / 255)
    assert (cfg.eval.val_steps, cfg.eval.test_steps) == (10, 20)
    assert cfg.finetune.batch_size == 64 and cfg.finetune.epochs == EPOCHS[dataset]
    assert space.resources.gpu > 0
    lr = space.parameters["finetune.lr"]
    assert all(lr.min <= ref <= lr.max for ref in REFERENCE_LR[method])
    assert space.scheduler.grace_period > cfg.finetune.warmup_epochs

    model = copy.deepcopy(_backbone(cfg.backbone.model_dump_json(), CLASSES[dataset]))
    apply_method(model, method, cfg.finetune.method_params)
    side = cfg.data.image_size or 32  # CIFAR is attacked at its native 32x32
    x, y = torch.rand(2, 3, side, side), torch.tensor([0, 1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = make_optimizer(trainable, cfg.finetune)
    x_adv = pgd(model, x, y, cfg.attack.eps, cfg.attack.step_size, steps=1)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= cfg.attack.eps + 1e-6
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
