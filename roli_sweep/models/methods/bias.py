"""Bias tuning (BitFit; Ben Zaken et al., ACL 2022): every backbone parameter whose name contains
``bias`` trains, plus the head. As in the RoLI reference (``tinytl-bias`` in its
``src/models/vit_models.py``), that includes Swin's ``relative_position_bias_table``."""
from __future__ import annotations

from pydantic import BaseModel

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, freeze_all_but_head, register_method


@register_method
class Bias(TransferMethod):
    name = "bias"

    def apply(self, model: NormalizedModel, params: BaseModel) -> None:
        freeze_all_but_head(model)
        for name, param in model.net.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)
