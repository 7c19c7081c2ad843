"""Backbones: local weights load (shipped ones match their model cards); normalisation is inside."""
from __future__ import annotations

import json

import pytest
import torch

from roli_sweep.config import BackboneConfig
from roli_sweep.models.backbone import SHIPPED_DIR, build_backbone, load_state_dict, model_card, shipped_backbones
from roli_sweep.pretrain import sha256
from tests.conftest import TINY_KWARGS


def test_both_source_backbones_are_shipped():
    assert {"fmnist59_vit_robust", "fmnist59_vit_standard"} <= set(shipped_backbones())


@pytest.mark.parametrize("name", shipped_backbones())
def test_shipped_backbone_matches_its_model_card(name):
    card = model_card(f"shipped:{name}")
    assert card["sha256"] == sha256(SHIPPED_DIR / f"{name}.safetensors")
    assert card["source"]["dataset"] == "fashion_mnist" and card["source"]["classes"] == [5, 6, 7, 8, 9]
    assert card["training"]["kind"] in ("adversarial", "standard")
    assert 0.0 <= card["evaluation"]["pgd_acc"] <= card["evaluation"]["clean_acc"] <= 1.0
    model = build_backbone(BackboneConfig(name=card["architecture"], kwargs=card["kwargs"], weights=f"shipped:{name}",
                                          mean=card["mean"], std=card["std"]), num_classes=3)
    saved = load_state_dict(SHIPPED_DIR / f"{name}.safetensors")
    for key, value in model.net.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, saved[key]), key
    assert model.head.out_features == 3
    assert (SHIPPED_DIR / f"{name}.yaml").is_file(), "the config that made it ships with it"
    assert json.loads((SHIPPED_DIR / f"{name}.json").read_text())["name"] == name


def test_local_weights_load_and_head_is_new(tiny_weights):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights))
    model = build_backbone(cfg, num_classes=3)
    saved = load_state_dict(tiny_weights)
    assert torch.equal(model.net.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert model.head.weight.shape == (3, TINY_KWARGS["embed_dim"])


def test_normalisation_is_inside_the_model(tiny_weights):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights), mean=[0.3], std=[0.2])
    model = build_backbone(cfg, num_classes=3).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - 0.3) / 0.2))


def test_weights_of_another_architecture_are_refused(tiny_weights):
    cfg = BackboneConfig(name="resnet18", kwargs={"in_chans": 1}, weights=str(tiny_weights))
    with pytest.raises(ValueError, match="stay random"):
        build_backbone(cfg, num_classes=3)


def test_pth_weights_load_with_weights_only(tmp_path, tiny_weights):
    pth = tmp_path / "tiny.pth"
    torch.save(load_state_dict(tiny_weights), pth)
    model = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(pth)), 3)
    assert torch.equal(model.net.pos_embed, load_state_dict(tiny_weights)["pos_embed"])
