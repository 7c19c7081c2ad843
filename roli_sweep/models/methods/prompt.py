"""Visual prompt tuning (VPT; Jia et al., ECCV 2022) for timm Vision Transformers and Swin Transformers.

**ViT** (``vit_*``, ``deit_*``): ``length`` learnable prompt tokens of width D are inserted after the
prefix tokens (class / register tokens) of the token sequence (B, P + N, D): ``shallow`` once,
before the first block; ``deep`` before every block, each block with its own prompts replacing the
previous block's prompt outputs. The prompt outputs are dropped after the last block, so the final
norm and the head see the usual (B, P + N, D) sequence.

**Swin** (``swin_*``, the RoLI reference's backbone for its VPT configs): deep prompts only. Every
block's window attention gets its own ``length`` prompt tokens of the block's width C, prepended to
the tokens of every window (nW * B, L + N, C), as VPT's ``PromptedSwinTransformer`` does: they get
no relative-position bias and are never masked by the shifted-window mask. Their outputs are
dropped after the attention, since the next block brings its own prompts (VPT-deep). Unlike VPT's
code, the prompts enter after the block's first norm, and the last block's prompt outputs are not
averaged into the pooled features.

Prompts start uniform in ``±sqrt(6 / (3 * patch_area + D))`` (the VPT paper's Xavier-style init; D =
the first stage's width on Swin). Prompt dropout acts only in train mode: evaluation and the
attacks' forward passes run in eval mode (roli_sweep.core.attacks.eval_mode). Paper setting: deep, 10
tokens (20 on CUB).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
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


class PromptedWindowAttention(nn.Module):
    """A Swin block's window attention with ``length`` prompt tokens prepended to every window.

    Maps windows (nW * B, N, C) to (nW * B, N, C), like the ``WindowAttention`` it wraps; the prompts
    (L, C) are the one new parameter, ``prompts``.
    """

    def __init__(self, attn: WindowAttention, length: int, dropout: float, init_bound: float) -> None:
        super().__init__()
        self.attn, self.dropout = attn, dropout
        self.prompts = nn.Parameter(torch.empty(length, attn.qkv.in_features))  # (L, C)
        nn.init.uniform_(self.prompts, -init_bound, init_bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn, (windows, n, c), length = self.attn, x.shape, self.prompts.shape[0]
        prompts = F.dropout(self.prompts, self.dropout, self.training).expand(windows, -1, -1)  # (nW*B, L, C)
        x = torch.cat([prompts, x], dim=1)  # (nW*B, L + N, C)
        qkv = attn.qkv(x).reshape(windows, length + n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (nW*B, heads, L + N, head_dim)
        bias = F.pad(attn._get_rel_pos_bias(), (length, 0, length, 0))  # (1, heads, L + N, L + N), 0 for prompts
        if mask is not None:  # (nW, N, N) shifted-window mask; prompts are seen by every token
            num_win = mask.shape[0]
            mask = F.pad(mask, (length, 0, length, 0)).view(1, num_win, 1, length + n, length + n)
            bias = (bias.unsqueeze(1) + mask).expand(windows // num_win, -1, -1, -1, -1)
            bias = bias.reshape(windows, attn.num_heads, length + n, length + n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = out.transpose(1, 2).reshape(windows, length + n, -1)[:, length:]  # drop the prompt outputs
        return attn.proj_drop(attn.proj(out))


class PromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    length: int = Field(10, ge=1, le=65_536, description="prompt tokens per layer (paper: 10, 20 on CUB)")
    deep: bool = Field(True, description="true: new prompts before every block (VPT-deep); false: first block only")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the prompts, train mode only")


@register_method
class Prompt(TransferMethod):
    name = "prompt"
    Params = PromptParams

    def apply(self, model: NormalizedModel, params: PromptParams) -> None:
        """Freeze the backbone and run its blocks with prompts.

        Raises:
            ValueError: the backbone is neither a timm ``VisionTransformer`` nor a ``SwinTransformer``
                (CNNs have no token sequence to prompt), ``deep: false`` on Swin, or timm's gradient
                checkpointing on a ViT.
        """
        net = model.net
        if isinstance(net, SwinTransformer):
            self._prompt_swin(net, params)
        elif isinstance(net, VisionTransformer):
            self._prompt_vit(net, params)
        else:
            raise ValueError(f"prompt supports timm VisionTransformer (vit_*, deit_*) and SwinTransformer (swin_*) "
                             f"backbones, not {type(net).__name__}")
        freeze_all_but_head(model)
        for module in net.modules():
            if isinstance(module, (PromptedBlocks, PromptedWindowAttention)):
                module.prompts.requires_grad_(True)

    @staticmethod
    def _init_bound(net: nn.Module, width: int) -> float:
        return math.sqrt(6.0 / (3 * math.prod(net.patch_embed.patch_size) + width))

    def _prompt_vit(self, net: VisionTransformer, params: PromptParams) -> None:
        if net.grad_checkpointing:
            raise ValueError("prompt: timm's gradient checkpointing runs the blocks without the prompts; turn it off")
        device = next(net.parameters()).device
        net.blocks = PromptedBlocks(net.blocks, net.num_prefix_tokens, net.embed_dim, params.length, params.deep,
                                    params.dropout, self._init_bound(net, net.embed_dim)).to(device)

    def _prompt_swin(self, net: SwinTransformer, params: PromptParams) -> None:
        if not params.deep:
            raise ValueError("prompt on Swin: only deep prompts (deep: true), as the RoLI reference's VPT configs")
        bound = self._init_bound(net, net.embed_dim)
        for module in list(net.modules()):
            if isinstance(module, SwinTransformerBlock):
                device = module.attn.qkv.weight.device
                module.attn = PromptedWindowAttention(module.attn, params.length, params.dropout, bound).to(device)
