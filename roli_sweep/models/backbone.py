"""Backbones: a timm model with local pretrained weights and input normalisation inside the model.

Normalising inside the model (as MadryLab robustness's ``AttackerModel`` does) means attacks and
eps always live in [0, 1] pixel space, whatever statistics the backbone was trained with.
Weights come from local files only (no hub): ``.safetensors`` (preferred) or ``.pth`` loaded with
``torch.load(weights_only=True)``, in the layouts robust-model releases use: a plain state dict,
one under ``model`` or ``state_dict`` (also nested, next to optimizer state, epoch and the like),
keys with DataParallel's ``module.`` prefix. timm's pretrained loader then adapts them to the
requested ``img_size`` / ``patch_size`` / ``in_chans`` (resampling patch and position embeddings)
and drops the source head, which the target task replaces. Which tensors matched is logged.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from roli_sweep._torchvision_compat import import_torchvision

import_torchvision()  # must precede the timm import on a CPU torch (see _torchvision_compat)
import timm  # noqa: E402

if TYPE_CHECKING:
    from roli_sweep.config import BackboneConfig


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
    found = _not_a_weights_file(path)
    if found:
        raise ValueError(f"weights file {str(path)!r} {found}")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"weights file {str(path)!r}: expected .safetensors, .pth, .pt or .bin")
    return path


def _not_a_weights_file(path: Path) -> str | None:
    """What is at ``path`` when it is not a non-empty regular file (read without opening it), else None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        return f"is {kind}, not a file"
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    if not os.access(path, os.R_OK):
        return "is not readable by this user"
    return None


def model_card(weights: str) -> dict[str, Any] | None:
    """The model card JSON next to a weights file (``<stem>.json``), if there is one."""
    card = resolve_weights(weights).with_suffix(".json")
    return json.loads(card.read_text()) if card.is_file() else None


CHECKPOINT_KEYS = ("state_dict", "model")
"""Keys under which checkpoints keep the model's state dict, tried in this order."""

DATA_PARALLEL_PREFIX = "module."
"""What ``nn.DataParallel`` / ``DistributedDataParallel`` put before every key of the wrapped model."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict in a weights file, unwrapped by :func:`unwrap_checkpoint`.

    Reads safetensors, or a pickle with ``weights_only=True`` (tensors and plain containers only,
    no code runs).

    Raises:
        ValueError: the pickle holds other objects (e.g. a training script's ``args``), or no state dict.
    """
    check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_checkpoint(load_file(str(path)), str(path))
    return unwrap_checkpoint(_load_pickle(path), str(path))


ZIP_MAGIC, PICKLE_PROTOCOL_2 = b"PK\x03\x04", b"\x80\x02"
"""How ``torch.save`` files begin: a zip archive (since torch 1.6), or a legacy pickle."""


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that say what the file holds, never how to unpickle code.

    Raises:
        ValueError: truncated, not a torch checkpoint, or a pickle with objects other than tensors.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(ZIP_MAGIC) or magic.startswith(PICKLE_PROTOCOL_2)):
        raise ValueError(f"backbone.weights: {str(path)!r} is not a PyTorch checkpoint (neither the zip archive nor "
                         "the pickle torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.findall(r"GLOBAL ([\w.]+)", str(err))
        raise ValueError(
            f"backbone.weights: {str(path)!r} is a pickle with objects other than tensors"
            f"{' (' + ', '.join(sorted(set(found))) + ')' if found else ''}, which are not loaded; save just the "
            "model's state dict (torch.save(model.state_dict(), ...)) or convert it to safetensors"
        ) from None
    except Exception as err:  # EOFError, RuntimeError, BadZipFile, IndexError (a 3-byte pickle), ...: all unreadable
        raise ValueError(f"backbone.weights: {str(path)!r} is truncated or corrupt, not a tensor pickle "
                         f"({path.stat().st_size} bytes; {type(err).__name__})") from None


def check_weights_file(path: Path) -> None:
    """Check that a weights file is readable and valid, before anything starts.

    A ``.safetensors`` file must have its header and every tensor's bytes (a truncated file fails
    here); a ``.pth`` / ``.pt`` / ``.bin`` must load with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: naming ``backbone.weights``, the path and what was found: missing, truncated, not a
            safetensors file, not a torch checkpoint, or a pickle with objects other than tensors.
    """
    found = _not_a_weights_file(path)
    if found:
        raise ValueError(f"backbone.weights: {str(path)!r} {found}")
    if path.suffix != ".safetensors":
        _load_pickle(path)
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length > SAFETENSORS_MAX_HEADER:
            raise ValueError(f"backbone.weights: {str(path)!r} is not a safetensors file: its header length field "
                             f"reads {length:,} bytes, more than safetensors' own limit of {SAFETENSORS_MAX_HEADER:,}")
        if not 0 < length <= size - 8:
            raise ValueError(f"backbone.weights: {str(path)!r} is not a safetensors file or is truncated "
                             f"({size} bytes; its header length field reads {length})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError(f"backbone.weights: {str(path)!r} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"backbone.weights: {str(path)!r} is not a safetensors file (its header is JSON "
                         f"{type(header).__name__}, not an object)")
    try:  # the library's own header check: tensor entries, dtypes, offsets against the file's size
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError(f"backbone.weights: {str(path)!r} is a safetensors file without tensors")
    except ValueError:
        raise
    except Exception as err:  # SafetensorError, whatever the file's defect
        reason = str(err).removeprefix("Error while deserializing header: ")
        if "not fully covered" in reason or "incomplete" in reason:
            reason = f"truncated ({size} bytes): {reason}"
        raise ValueError(f"backbone.weights: {str(path)!r} is not a valid safetensors file: {reason[:200]}") from None


SAFETENSORS_MAX_HEADER = 100_000_000
"""safetensors refuses headers longer than this (``MAX_HEADER_SIZE``, safetensors' ``lib.rs``): nothing longer is read."""


def unwrap_checkpoint(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint``, with DataParallel's ``module.`` prefixes removed.

    A dict of tensors is the state dict; otherwise the first of :data:`CHECKPOINT_KEYS` holding a
    dict is descended into, repeatedly (``{"model": {"state_dict": {...}}, "epoch": 5}``).

    Raises:
        ValueError: no dict of tensors is found (the message names ``source`` and the keys seen).
    """
    state = checkpoint
    while not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        inner = [state[k] for k in CHECKPOINT_KEYS if isinstance(state, dict) and isinstance(state.get(k), dict)]
        if not inner:
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"weights {source!r}: no state dict found (a dict of tensors, possibly under "
                             f"{' / '.join(CHECKPOINT_KEYS)}); found {found}")
        state = inner[0]
    return {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}


class NormalizedModel(nn.Module):
    """``net((resize(x) - mean) / std)``: images (B, C, H, W) in [0, 1] -> logits (B, num_classes).

    With ``input_size`` set, images are resized (bilinear, differentiable) to ``input_size`` square
    inside the model, so attacks perturb the dataset's native pixels (CIFAR at 32x32, as the RoLI
    reference does) while the backbone sees its own resolution.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], input_size: int | None = None) -> None:
        super().__init__()
        self.net, self.input_size = net, input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)

    @property
    def head(self) -> nn.Module:
        """The classifier layer (timm's ``get_classifier()``)."""
        return self.net.get_classifier()


def build_backbone(cfg: BackboneConfig, num_classes: int) -> NormalizedModel:
    """Create ``cfg.name`` with ``cfg.kwargs`` and a fresh ``num_classes`` head, loading ``cfg.weights``.

    The source head is never loaded: the target task has its own classes. Matched, missing and
    unexpected checkpoint keys are logged.

    Raises:
        ValueError: the weights file is missing, holds no state dict or objects other than tensors,
            or matches less than half of the backbone's tensors (the backbone would silently stay random).
    """
    kwargs = dict(cfg.kwargs, num_classes=num_classes)
    if cfg.weights is None:
        log.warning("backbone %s has no weights: random initialisation", cfg.name)
        net = timm.create_model(cfg.name, pretrained=False, **kwargs)
        return NormalizedModel(net, cfg.mean, cfg.std, cfg.input_size)

    path = resolve_weights(cfg.weights)
    probe = timm.create_model(cfg.name, pretrained=False, **kwargs)
    head_keys = {f"{name}.{p}" for name in _classifier_names(probe) for p in ("weight", "bias")}
    state = {k: v for k, v in load_state_dict(path).items() if k not in head_keys}
    _check_keys(probe, state, head_keys, f"weights {str(path)!r} for {cfg.name}")
    in_chans = cfg.kwargs.get("in_chans", 3)
    net = timm.create_model(
        cfg.name,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=state, num_classes=0, input_size=(in_chans, 224, 224)),
        **kwargs,
    )
    return NormalizedModel(net, cfg.mean, cfg.std, cfg.input_size)


def _check_keys(net: nn.Module, state: dict[str, torch.Tensor], head_keys: set[str], source: str) -> None:
    """Log which of ``net``'s backbone tensors ``state`` provides: matched, missing and unexpected keys.

    Keys are compared as timm will load them (see :func:`_as_timm_loads`); ``head_keys`` (the
    classifier, replaced by the target head) count as neither.

    Raises:
        ValueError: less than half of the backbone tensors are in ``state`` (the backbone would stay
            random); the message gives examples of missing and unexpected keys.
    """
    model_keys = set(net.state_dict())
    backbone_keys = model_keys - head_keys
    loaded = set(_as_timm_loads(net, state))
    matched = backbone_keys & loaded
    missing, unexpected = sorted(backbone_keys - loaded), sorted(loaded - model_keys)
    if len(matched) < len(backbone_keys) / 2:
        raise ValueError(
            f"{source} match only {len(matched)} of {len(backbone_keys)} backbone tensors: the backbone would "
            f"stay random (wrong architecture or kwargs?); e.g. missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    log.info("%s: %d of %d backbone tensors loaded", source, len(matched), len(backbone_keys))
    if missing:
        log.warning("%s: %d backbone tensors missing, they stay randomly initialised: %s",
                    source, len(missing), ", ".join(missing))
    if unexpected:
        log.warning("%s: %d unexpected tensors ignored: %s", source, len(unexpected), ", ".join(unexpected))


def _as_timm_loads(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` after the ``checkpoint_filter_fn`` of ``net``'s timm module, where it has one.

    timm applies that filter before loading: it renames keys of older layouts (e.g. the original
    Swin's downsample placement) and drops non-persistent buffers (Swin's ``attn_mask``), so key
    names are only comparable after it. If the filter cannot read ``state`` (a checkpoint of another
    architecture), ``state`` is returned unchanged and its key names are compared as they are.
    """
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), net)
    except Exception:  # noqa: BLE001 -- any failure means "not this architecture's layout"; the key check reports it
        return state


def _classifier_names(net: nn.Module) -> list[str]:
    classifier = net.pretrained_cfg.get("classifier", "head")
    return [classifier] if isinstance(classifier, str) else list(classifier)
