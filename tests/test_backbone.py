"""Backbones: local weights load (shipped ones match their model cards, checkpoint layouts unwrap); normalisation is inside."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from roli_sweep.config import BackboneConfig
from roli_sweep.models.backbone import SHIPPED_DIR, build_backbone, load_state_dict, model_card, shipped_backbones
from roli_sweep.core.pretrain import sha256
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


def _tiny_cfg(weights) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(weights))


LAYOUTS = {
    "plain": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    "state_dict": lambda sd: {"state_dict": sd, "arch": "vit_tiny_patch16_224"},
    "nested": lambda sd: {"model": {"state_dict": sd}, "epoch": 7},
    "data_parallel": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "model_data_parallel": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layouts_load(tmp_path, tiny_weights, layout):
    source = load_state_dict(tiny_weights)
    pth = tmp_path / f"{layout}.pth"
    torch.save(LAYOUTS[layout](source), pth)
    assert load_state_dict(pth).keys() == source.keys()
    model = build_backbone(_tiny_cfg(pth), num_classes=3)
    for key, value in model.net.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, source[key]), key


def test_missing_and_unexpected_keys_are_reported(tmp_path, tiny_weights, caplog):
    state = load_state_dict(tiny_weights)
    del state["blocks.0.mlp.fc2.bias"]
    state["teacher.proj.weight"] = torch.zeros(2, 2)
    pth = tmp_path / "partial.pth"
    torch.save({"model": state}, pth)
    with caplog.at_level(logging.INFO, logger="roli_sweep.models.backbone"):
        build_backbone(_tiny_cfg(pth), num_classes=3)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "roli_sweep.models.backbone")
    assert "1 backbone tensors missing" in text and "blocks.0.mlp.fc2.bias" in text
    assert "1 unexpected tensors ignored: teacher.proj.weight" in text
    assert "head.weight" not in text, "the source head is replaced, not reported"


def test_checkpoint_with_foreign_prefix_would_stay_random(tmp_path, tiny_weights):
    pth = tmp_path / "wrapped.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in load_state_dict(tiny_weights).items()}}, pth)
    with pytest.raises(ValueError, match=r"stay random.*unexpected \['encoder\."):
        build_backbone(_tiny_cfg(pth), num_classes=3)


def test_checkpoints_without_a_state_dict_are_refused(tmp_path, tiny_weights):
    pth = tmp_path / "no_state.pth"
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, pth)
    with pytest.raises(ValueError, match=r"no state dict found.*\['epoch', 'optimizer'\]"):
        load_state_dict(pth)
    pickled = tmp_path / "with_args.pth"
    torch.save({"model": load_state_dict(tiny_weights), "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_state_dict(pickled)


def test_inputs_are_resized_inside_the_model(tiny_weights):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights), input_size=8)
    model = build_backbone(cfg, num_classes=3).eval()
    x = torch.rand(2, 1, 4, 4, requires_grad=True)  # native 4x4, the backbone sees 8x8
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "the attack's gradient reaches the native pixels"
