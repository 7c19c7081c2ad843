"""Linear probing: the backbone stays frozen, only the head trains (paper, Sec. 3)."""
from __future__ import annotations

from pydantic import BaseModel

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, freeze_all_but_head, register_method


@register_method
class Linear(TransferMethod):
    name = "linear"

    def apply(self, model: NormalizedModel, params: BaseModel) -> None:
        freeze_all_but_head(model)
