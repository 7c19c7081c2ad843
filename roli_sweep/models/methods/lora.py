"""LoRA (Hu et al., 2022) through peft: low-rank updates on chosen linear layers, plus the head.

peft initialises A with Kaiming-uniform and B with zeros, so the model starts unchanged and both
matrices receive gradients once B moves. (The RoLI reference code zeroes both, so neither ever
learns: ../shared/PAPER.md.) Paper setting: rank 16, alpha 16, dropout 0.1 on the attention
projections; for timm ViTs that is the fused ``qkv`` linear.
"""
from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from pydantic import BaseModel, ConfigDict, Field

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, register_method


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    r: int = Field(8, ge=1, le=65_536, description="rank of the update")
    alpha: float = Field(8.0, gt=0.0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA input (off in eval mode and in attacks)")
    target_modules: list[str] = Field(default_factory=lambda: ["qkv"], min_length=1,
                                      description="names (suffixes) of the nn.Linear layers to adapt")


@register_method
class Lora(TransferMethod):
    name = "lora"
    Params = LoraParams

    def apply(self, model: NormalizedModel, params: LoraParams) -> None:
        config = LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
                            target_modules=list(params.target_modules), init_lora_weights=True)
        inject_adapter_in_model(config, model.net)  # freezes everything but the LoRA matrices
        model.head.requires_grad_(True)
