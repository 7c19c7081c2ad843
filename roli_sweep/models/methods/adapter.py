"""Bottleneck adapters (Houlsby et al., ICML 2019) after the MLP of every transformer block.

Each adapter computes ``h + up(GELU(down(h)))`` on the MLP output ``h`` of shape (B, T, D), with
``down: D -> D / reduction_factor`` and ``up`` back to D. ``down`` starts random (Kaiming-uniform,
PyTorch's Linear default) and ``up`` at zero, so every block starts as the identity and both
projections get gradients once ``up`` moves. (The RoLI reference code zeroes all four tensors, so
with GELU(0) = 0 only the up-projection bias ever learns: ../shared/PAPER.md.) Paper setting:
reduction factor 8.

Works for any timm model whose blocks use ``timm.layers.Mlp`` (ViT, DeiT, Swin, ...). No
maintained library adds bottleneck adapters to timm models (peft has no Houlsby adapter; AdapterHub
targets Hugging Face transformers), so this small module is our own.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from timm.layers import Mlp
from torch import nn

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, freeze_all_but_head, register_method


class Adapter(nn.Module):
    """``h + up(GELU(down(h)))`` on (B, T, D) features; identity at initialisation (``up`` is zero)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _run_adapter(mlp: Mlp, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: replace the MLP's output h by ``mlp.adapter(h)``."""
    return mlp.adapter(output)


class AdapterParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reduction_factor: int | None = Field(None, ge=1, le=65_536, description="hidden size = block width / reduction_factor "
                                         "(8 when neither this nor hidden_size is given)")
    hidden_size: int | None = Field(None, ge=1, le=65_536, description="fixed hidden size (instead of reduction_factor)")

    @model_validator(mode="after")
    def _one_size(self) -> AdapterParams:
        if self.reduction_factor is not None and self.hidden_size is not None:
            raise ValueError("give one of reduction_factor and hidden_size, not both")
        if self.reduction_factor is None and self.hidden_size is None:
            self.reduction_factor = 8
        return self


@register_method
class AdapterMethod(TransferMethod):
    name = "adapter"
    Params = AdapterParams

    def apply(self, model: NormalizedModel, params: AdapterParams) -> None:
        """Freeze the backbone and add a new adapter after every ``Mlp`` of it.

        Raises:
            ValueError: the backbone has no ``timm.layers.Mlp`` module.
        """
        freeze_all_but_head(model)
        targets = [(name, module) for name, module in model.net.named_modules()
                   if isinstance(module, Mlp) and name]
        if not targets:
            raise ValueError(f"adapter: {type(model.net).__name__} has no timm Mlp blocks to adapt")
        for _, mlp in targets:
            dim = mlp.fc2.out_features
            hidden = params.hidden_size or max(1, dim // params.reduction_factor)
            # a child of the Mlp run by a forward hook: the backbone's own parameter names stay unchanged
            mlp.adapter = Adapter(dim, hidden).to(mlp.fc2.weight.device)
            mlp.register_forward_hook(_run_adapter)
