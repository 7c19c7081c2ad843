"""The transfer-method interface and its registry (one method per file, registered by name,
as peft registers its tuners with ``register_peft_method``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from roli_sweep.models.backbone import NormalizedModel


class NoParams(BaseModel):
    """For methods without parameters of their own."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TransferMethod(ABC):
    """Decides which parameters of a backbone train in stage 2, adding modules if the method has any.

    Subclasses set ``name`` and ``Params`` (a pydantic model, ``extra="forbid"``, a doc on every
    field) and implement :meth:`apply`. The head always trains.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    freezes_backbone: ClassVar[bool] = True
    """Whether the backbone's own weights stay (mostly) frozen: then, by default, its layers run in
    eval mode during finetuning, as in the RoLI reference (``finetune.backbone_mode: auto``)."""

    @abstractmethod
    def apply(self, model: NormalizedModel, params: BaseModel) -> None:
        """Modify ``model`` in place so that exactly the method's parameters (and the head) require grad."""


METHODS: dict[str, TransferMethod] = {}


def register_method(cls: type[TransferMethod]) -> type[TransferMethod]:
    """Class decorator: register one instance of a method under ``cls.name``.

    Raises:
        ValueError: ``cls.name`` is registered already (a second method would silently replace the first).
    """
    if cls.name in METHODS:
        raise ValueError(f"transfer method {cls.name!r} is registered already (by {type(METHODS[cls.name]).__name__})")
    METHODS[cls.name] = cls()
    return cls


def freeze_all_but_head(model: NormalizedModel) -> None:
    """Only the classifier requires grad (linear probing)."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)


def apply_method(model: NormalizedModel, method: str, params: dict) -> None:
    """Apply the registered ``method`` with its (already validated) ``params`` dict to ``model``."""
    impl = METHODS[method]
    impl.apply(model, impl.Params.model_validate(params))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
