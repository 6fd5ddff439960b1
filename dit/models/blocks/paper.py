"""The four conditioning variants of the DiT paper (Peebles & Xie 2023, section 3.2, Figure 3): in-context
conditioning, cross-attention, adaptive layer norm (adaLN) and adaLN-Zero, the paper's choice. adaLN-Zero's
parameter names, shapes and chunk order are those of the released DiT checkpoints."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from dit.models.blocks.base import AdaLNFinalLayer, Block, block_mlp, block_norm, self_attention
from dit.models.blocks.layers import CrossAttention, ModulatedNorm
from dit.models.config import DiTConfig

__all__ = ["AdaLNBlock", "AdaLNZeroBlock", "CrossAttentionBlock", "DiTBlock", "InContextBlock"]


class InContextBlock(Block):
    """In-context conditioning: t and c are two extra tokens in the sequence, treated like image
    tokens by a standard ViT block, and removed after the last block (like a ViT cls token)."""

    name = "in_context"

    num_extra_tokens: ClassVar[int] = 2

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm1 = block_norm(config)
        self.attn = self_attention(config, self.num_extra_tokens)
        self.norm2 = block_norm(config)
        self.mlp = block_mlp(config)

    @staticmethod
    def add_tokens(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, x], dim=1)  # (N, 2 + T, D)

    @staticmethod
    def remove_tokens(x: torch.Tensor) -> torch.Tensor:
        return x[:, InContextBlock.num_extra_tokens :]  # (N, T, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(Block):
    """Cross-attention conditioning: t and c form a length-2 sequence apart from the image tokens; a
    multi-head cross-attention layer after self-attention reads it (the most Gflops, ~15% more)."""

    name = "cross_attn"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm1 = block_norm(config)
        self.attn = self_attention(config)
        self.norm2 = block_norm(config)
        self.cross_attn = CrossAttention(config.hidden_size, config.num_heads)
        self.norm3 = block_norm(config)
        self.mlp = block_mlp(config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), c)  # c: (N, 2, D)
        return x + self.mlp(self.norm3(x))


class AdaLNBlock(Block):
    """Adaptive layer norm: the LayerNorms' scale and shift (gamma, beta) are regressed from t + c,
    the same for every token (the fewest Gflops)."""

    name = "adaln"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 4 * config.hidden_size))
        self.norm1 = ModulatedNorm(config.norm, config.norm_eps)  # parameter-free: the official state dict
        self.norm2 = ModulatedNorm(config.norm, config.norm_eps)

    @staticmethod
    def condition(t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        return t_emb + y_emb  # (N, D)

    @staticmethod
    def final_layer(config: DiTConfig) -> nn.Module:
        return AdaLNFinalLayer(config, False, ModulatedNorm(config.norm, 1e-6))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)  # (N, D) each
        x = x + self.attn(self.norm1(x, shift_msa, scale_msa))
        return x + self.mlp(self.norm2(x, shift_mlp, scale_mlp))


class AdaLNZeroBlock(Block):
    """adaLN-Zero: adaLN plus dimension-wise gates alpha before each residual connection; the
    modulation MLP is zero-initialised so alpha = 0 and the block starts as the identity.
    Parameter names, shapes and chunk order are those of the released DiT checkpoints."""

    name = "adaln_zero"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * config.hidden_size))
        self.norm1 = ModulatedNorm(config.norm, config.norm_eps)
        self.norm2 = ModulatedNorm(config.norm, config.norm_eps)

    condition = staticmethod(AdaLNBlock.condition)

    @staticmethod
    def final_layer(config: DiTConfig) -> nn.Module:
        return AdaLNFinalLayer(config, True, ModulatedNorm(config.norm, 1e-6))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x, shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x, shift_mlp, scale_mlp))

    def initialize_conditioning(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)


DiTBlock = AdaLNZeroBlock  # the official DiT code's name for its block (models.py: DiTBlock is adaLN-Zero)
