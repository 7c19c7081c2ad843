"""Backbones: a timm model with local pretrained weights and input normalisation inside the model.

Normalising inside the model (as MadryLab robustness's ``AttackerModel`` does) means attacks and
eps always live in [0, 1] pixel space, whatever statistics the backbone was trained with.
Weights come from local files only (no hub): ``.safetensors`` (preferred) or ``.pth`` loaded with
``torch.load(weights_only=True)``; timm's pretrained loader then adapts them to the requested
``img_size`` / ``patch_size`` / ``in_chans`` (resampling patch and position embeddings) and drops
the source head, which the target task replaces.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roli_sweep._torchvision_compat import import_torchvision

import_torchvision()  # must precede the timm import on a CPU torch (see _torchvision_compat)
import timm  # noqa: E402

from roli_sweep.config import BackboneConfig  # noqa: E402

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "backbones"
SHIPPED_PREFIX = "shipped:"


def timm_model_exists(name: str) -> bool:
    """Whether timm has an architecture called ``name`` (with or without a pretrained tag)."""
    return timm.is_model(name)


def shipped_backbones() -> list[str]:
    """Names of the backbones shipped as package data (``shipped:<name>``)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def resolve_weights(weights: str) -> Path:
    """The weights file for ``weights`` (a path, or ``shipped:<name>``).

    Raises:
        ValueError: an unknown shipped name (the message lists them) or a missing / unsupported file.
    """
    if weights.startswith(SHIPPED_PREFIX):
        name = weights.removeprefix(SHIPPED_PREFIX)
        path = SHIPPED_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"no shipped backbone {name!r}; shipped: {shipped_backbones()}")
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"weights file {str(path)!r}: expected .safetensors, .pth, .pt or .bin")
    return path


def model_card(weights: str) -> dict[str, Any] | None:
    """The model card JSON next to a weights file (``<stem>.json``), if there is one."""
    card = resolve_weights(weights).with_suffix(".json")
    return json.loads(card.read_text()) if card.is_file() else None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a pickle with ``weights_only=True`` (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)``: takes images (B, C, H, W) in [0, 1], returns logits (B, num_classes)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def head(self) -> nn.Module:
        """The classifier layer (timm's ``get_classifier()``)."""
        return self.net.get_classifier()


def build_backbone(cfg: BackboneConfig, num_classes: int) -> NormalizedModel:
    """Create ``cfg.name`` with ``cfg.kwargs`` and a fresh ``num_classes`` head, loading ``cfg.weights``.

    The source head is never loaded: the target task has its own classes.

    Raises:
        ValueError: the weights file is missing, or it matches less than half of the backbone's
            tensors (the backbone would silently stay random).
    """
    kwargs = dict(cfg.kwargs, num_classes=num_classes)
    if cfg.weights is None:
        log.warning("backbone %s has no weights: random initialisation", cfg.name)
        net = timm.create_model(cfg.name, pretrained=False, **kwargs)
        return NormalizedModel(net, cfg.mean, cfg.std)

    path = resolve_weights(cfg.weights)
    probe = timm.create_model(cfg.name, pretrained=False, **kwargs)
    head_keys = {f"{name}.{p}" for name in _classifier_names(probe) for p in ("weight", "bias")}
    state = {k: v for k, v in load_state_dict(path).items() if k not in head_keys}
    backbone_keys = set(probe.state_dict()) - head_keys
    matched = backbone_keys & set(state)
    if len(matched) < len(backbone_keys) / 2:
        raise ValueError(
            f"weights {str(path)!r} match only {len(matched)} of {len(backbone_keys)} tensors of {cfg.name}: "
            "the backbone would stay random (wrong architecture or kwargs?)"
        )
    in_chans = cfg.kwargs.get("in_chans", 3)
    net = timm.create_model(
        cfg.name,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=state, num_classes=0, input_size=(in_chans, 224, 224)),
        **kwargs,
    )
    return NormalizedModel(net, cfg.mean, cfg.std)


def _classifier_names(net: nn.Module) -> list[str]:
    classifier = net.pretrained_cfg.get("classifier", "head")
    return [classifier] if isinstance(classifier, str) else list(classifier)
