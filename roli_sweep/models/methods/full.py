"""Full finetuning: every parameter of backbone and head trains."""
from __future__ import annotations

from pydantic import BaseModel

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, register_method


@register_method
class Full(TransferMethod):
    name = "full"
    freezes_backbone = False

    def apply(self, model: NormalizedModel, params: BaseModel) -> None:
        model.requires_grad_(True)
