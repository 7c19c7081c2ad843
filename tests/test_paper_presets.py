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
METHODS = ("linear", "full", "lora", "adapter", "prompt", "bias")
# Reference stage-2 (lr, weight decay) per (method, dataset) and head init, from the RoLI code's
# configs/ (github.com/DongXzz/RoLI, commit e955131; linear and VPT have RanLI files only).
REF = {
 ("adapter","caltech256"): {"ranli": (0.005, 0.0001), "roli": (0.0005, 0.0)},
 ("adapter","cifar10"): {"ranli": (0.05, 0.01), "roli": (0.05, 0.01)},
 ("adapter","cifar100"): {"ranli": (0.005, 0.0001), "roli": (0.05, 0.0001)},
 ("adapter","cub200"): {"ranli": (0.05, 0.0001), "roli": (0.05, 0.001)},
 ("adapter","stanford_dogs"): {"ranli": (0.005, 0.0001), "roli": (0.0001, 0.0001)},
 ("bias","caltech256"): {"ranli": (0.001, 0.01), "roli": (0.00001, 0.0)},
 ("bias","cifar10"): {"ranli": (0.005, 0.001), "roli": (0.005, 0.001)},
 ("bias","cifar100"): {"ranli": (0.005, 0.001), "roli": (0.005, 0.01)},
 ("bias","cub200"): {"ranli": (0.005, 0.001), "roli": (0.0005, 0.0001)},
 ("bias","stanford_dogs"): {"ranli": (0.001, 0.0001), "roli": (0.00005, 0.0001)},
 ("full","caltech256"): {"ranli": (0.0005, 0.0001), "roli": (0.0001, 0.0001)},
 ("full","cifar10"): {"ranli": (0.0005, 0.01), "roli": (0.0001, 0.01)},
 ("full","cifar100"): {"ranli": (0.0005, 0.001), "roli": (0.0001, 0.001)},
 ("full","cub200"): {"ranli": (0.0005, 0.001), "roli": (0.0001, 0.01)},
 ("full","stanford_dogs"): {"ranli": (0.0005, 0.01), "roli": (0.00005, 0.001)},
 ("linear","caltech256"): {"ranli": (0.5, 0.01)},
 ("linear","cifar10"): {"ranli": (0.05, 0.01)},
 ("linear","cifar100"): {"ranli": (0.1, 0.001)},
 ("linear","cub200"): {"ranli": (1.0, 0.001)},
 ("linear","stanford_dogs"): {"ranli": (1.0, 0.01)},
 ("lora","caltech256"): {"ranli": (0.001, 0.0001), "roli": (0.0001, 0.0001)},
 ("lora","cifar10"): {"ranli": (0.01, 0.0001), "roli": (0.001, 0.0001)},
 ("lora","cifar100"): {"ranli": (0.05, 0.0), "roli": (0.001, 0.0001)},
 ("lora","cub200"): {"ranli": (0.005, 0.0001), "roli": (0.005, 0.0001)},
 ("lora","stanford_dogs"): {"ranli": (0.005, 0.0001), "roli": (0.001, 0.01)},
 ("prompt","caltech256"): {"ranli": (0.05, 0.001)},
 ("prompt","cifar10"): {"ranli": (0.5, 0.001)},
 ("prompt","cifar100"): {"ranli": (0.5, 0.01)},
 ("prompt","cub200"): {"ranli": (0.05, 0.001)},
 ("prompt","stanford_dogs"): {"ranli": (0.05, 0.0001)},
}



def test_a_preset_for_every_dataset_and_method():
    assert {p.stem for p in PRESETS} == {f"{d}_{m}" for d in CLASSES for m in METHODS}


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
    refs = REF[(method, dataset)]
    lr = space.parameters["finetune.lr"]
    assert all(lr.min <= ref_lr <= lr.max for ref_lr, _ in refs.values())
    wd = space.parameters.get("finetune.weight_decay")
    assert {ref_wd for _, ref_wd in refs.values()} <= (set(wd.values) if wd else {cfg.finetune.weight_decay})
    assert (cfg.probe.lr, cfg.probe.weight_decay, cfg.probe.optimizer) == (*REF[("linear", dataset)]["ranli"], "sgd")
    assert cfg.finetune.warmup_epochs == cfg.probe.warmup_epochs == 10
    assert space.scheduler.grace_period > cfg.finetune.warmup_epochs
    assert cfg.backbone.name == ("vit_base_patch16_224" if method == "prompt" else "swin_base_patch4_window7_224")

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
