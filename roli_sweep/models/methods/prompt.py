"""Visual prompt tuning (VPT; Jia et al., ECCV 2022) for timm Vision Transformers.

``length`` learnable prompt tokens of width D are inserted after the prefix tokens (class /
register tokens) of the token sequence (B, P + N, D): ``shallow`` once, before the first block;
``deep`` before every block, each block with its own prompts replacing the previous block's
prompt outputs. The prompt outputs are dropped after the last block, so the final norm and the
head see the usual (B, P + N, D) sequence. Prompts start uniform in ``±sqrt(6 / (3 * patch_area +
D))`` (the VPT paper's Xavier-style init). Prompt dropout acts only in train mode: evaluation and
the attacks' forward passes run in eval mode (roli_sweep.attacks.eval_mode). Paper setting: deep,
10 tokens (20 on CUB).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, freeze_all_but_head, register_method


class PromptedBlocks(nn.Sequential):
    """A ViT's blocks run with prompt tokens; maps (B, P + N, D) to (B, P + N, D).

    A ``Sequential`` of the same blocks, so the backbone's parameter names do not change; the
    prompts are the one new parameter, ``blocks.prompts``.
    """

    def __init__(self, blocks: nn.Sequential, prefix_tokens: int, dim: int, length: int, deep: bool,
                 dropout: float, init_bound: float) -> None:
        super().__init__(*blocks)
        self.prefix, self.length, self.deep, self.dropout = prefix_tokens, length, deep, dropout
        self.prompts = nn.Parameter(torch.empty(len(blocks) if deep else 1, length, dim))  # (layers, L, D)
        nn.init.uniform_(self.prompts, -init_bound, init_bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, p, n = x.shape[0], self.prefix, self.length
        for i, block in enumerate(self):
            if i == 0 or self.deep:
                prompt = F.dropout(self.prompts[i if self.deep else 0], self.dropout, self.training)
                prompt = prompt.expand(batch, -1, -1)  # (B, L, D)
                rest = x[:, p:] if i == 0 else x[:, p + n:]  # drop the previous block's prompt outputs
                x = torch.cat([x[:, :p], prompt, rest], dim=1)  # (B, P + L + N, D)
            x = block(x)
        return torch.cat([x[:, :p], x[:, p + n:]], dim=1)  # (B, P + N, D)


class PromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    length: int = Field(10, ge=1, description="prompt tokens per layer (paper: 10, 20 on CUB)")
    deep: bool = Field(True, description="true: new prompts before every block (VPT-deep); false: first block only")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the prompts, train mode only")


@register_method
class Prompt(TransferMethod):
    name = "prompt"
    Params = PromptParams

    def apply(self, model: NormalizedModel, params: PromptParams) -> None:
        """Freeze the backbone and run its blocks with prompts.

        Raises:
            ValueError: the backbone is not a timm ``VisionTransformer`` (Swin and CNNs have no token
                sequence to prompt in this form).
        """
        net = model.net
        if not isinstance(net, VisionTransformer):
            raise ValueError(f"prompt supports timm VisionTransformer backbones (vit_*, deit_*), "
                             f"not {type(net).__name__}")
        if net.grad_checkpointing:
            raise ValueError("prompt: timm's gradient checkpointing runs the blocks without the prompts; turn it off")
        freeze_all_but_head(model)
        patch_area = math.prod(net.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch_area + net.embed_dim))
        device = next(net.parameters()).device
        net.blocks = PromptedBlocks(net.blocks, net.num_prefix_tokens, net.embed_dim, params.length, params.deep,
                                    params.dropout, bound).to(device)
