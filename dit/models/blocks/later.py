"""Conditioning variants from work after the DiT paper: DiffiT's time-dependent self-attention (Hatamizadeh et al.
2024) and PixArt-alpha's adaLN-single (Chen et al. 2023), each with its final layer."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit.models.blocks.base import Block, block_mlp, block_norm, block_rope, decoder, self_attention
from dit.models.blocks.layers import Attention, ModulatedNorm, RoPE2d, make_norm
from dit.models.blocks.paper import AdaLNBlock
from dit.models.config import DiTConfig

__all__ = [
    "AdaLNSingleBlock",
    "AdaLNSingleFinalLayer",
    "DiffiTBlock",
    "DiffiTFinalLayer",
    "SharedModulation",
    "TimeDependentAttention",
]


#################################################################################
#                                    DiffiT                                     #
#################################################################################


class TimeDependentAttention(Attention):
    """DiffiT's time-dependent multi-head self-attention (TMSA, DiffiT section 3.1, eqs. 3-6):

        q = x W_qs + c W_qt,  k = x W_ks + c W_kt,  v = x W_vs + c W_vt
        TMSA = softmax(q k^T / sqrt(d) + B) v

    with c (N, D) the conditioning token (one per sample, broadcast over the tokens) and B a learned
    relative position bias (Swin-style table of (2G-1)^2 entries per head, G = grid side, indexed by
    the 2-D offset between query and key token). Names follow NVlabs/DiffiT: ``qkv_temb``,
    ``relative_position_bias_table``. The bias covers the whole grid (DiffiT's latent model uses one
    window = the full 16x16 grid at 256px).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int, qk_norm: bool = False, rope: RoPE2d | None = None):
        super().__init__(dim, num_heads, qk_norm, rope)
        if grid_size < 1:
            raise ValueError("block diffit needs the grid size (DiTConfig.grid_size) for its relative position bias")
        self.qkv_temb = nn.Linear(dim, 3 * dim)  # W_qt, W_kt, W_vt (with bias, as NVlabs/DiffiT)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2, num_heads))
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()  # token k = row * G + col
        d_row = rows[:, None] - rows[None, :] + grid_size - 1  # (T, T) in [0, 2G-2]
        d_col = cols[:, None] - cols[None, :] + grid_size - 1
        # A fixed function of the grid: a buffer, left out of the state dict.
        self.register_buffer("relative_position_index", d_row * (2 * grid_size - 1) + d_col, persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x) + self.qkv_temb(c).unsqueeze(1)  # (N, T, 3D): the time term is per sample
        bias = self.relative_position_bias_table[self.relative_position_index]  # (T, T, H)
        return self.attend(qkv, bias.permute(2, 0, 1).unsqueeze(0).to(qkv.dtype))  # bias (1, H, T, T)


class DiffiTBlock(Block):
    """DiffiT (Hatamizadeh et al. 2024, section 3.1, eqs. 7-8): conditioning inside self-attention
    (TMSA, see TimeDependentAttention), no adaLN:

        x = x + TMSA(LN(x), c);   x = x + MLP(LN(x))

    Choices where the paper is silent, following the NVlabs/DiffiT code: c = t_emb + y_emb (its
    latent model adds the class embedding to the time embedding: "time token"); the LayerNorms have
    no affine parameters; the relative position bias table is truncated-normal (std 0.02, as Swin);
    every Linear, W_qt/W_kt/W_vt included, is xavier-uniform like the rest of the DiT; the final layer
    is LN -> SiLU -> Linear with the Linear zero-initialised (the paper: "a simple linear layer")."""

    name = "diffit"
    routing_refusal = "block diffit's relative position bias spans every pair of tokens on the grid"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm1 = block_norm(config, affine=False)
        rope = block_rope(config)
        self.attn = TimeDependentAttention(config.hidden_size, config.num_heads, config.grid_size, config.qk_norm, rope)
        self.norm2 = block_norm(config, affine=False)
        self.mlp = block_mlp(config)

    condition = staticmethod(AdaLNBlock.condition)

    @staticmethod
    def final_layer(config: DiTConfig) -> nn.Module:
        return DiffiTFinalLayer(config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), c)  # c: (N, D)
        return x + self.mlp(self.norm2(x))

    def initialize_conditioning(self) -> None:
        nn.init.trunc_normal_(self.attn.relative_position_bias_table, std=0.02)


class DiffiTFinalLayer(nn.Module):
    """NVlabs/DiffiT's decoder: norm (no affine) -> SiLU -> Linear, the Linear zero-initialised."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm_final = make_norm(config.norm, config.hidden_size, eps=1e-6, affine=False)
        self.linear = decoder(config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.norm_final(x)))

    def initialize_conditioning(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


#################################################################################
#                                 adaLN-single                                  #
#################################################################################


class SharedModulation(nn.Module):
    """adaLN-single's one MLP for all blocks (PixArt-alpha section 2.3, their ``t_block``):
    c (N, D) -> SiLU -> Linear -> the six (N, D) shift/scale/gate vectors, computed once per forward.

    Init: PixArt's normal(0, 0.02) weight and zero bias, except the two gate rows, which start at zero
    (PixArt does not zero them; we do so that every block starts as the identity, as adaLN-Zero)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.t_block(c).unflatten(1, (6, self.hidden_size))  # (N, 6, D)

    def initialize_conditioning(self) -> None:
        linear = self.t_block[-1]
        nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
        for gate in AdaLNSingleBlock.GATES:
            nn.init.zeros_(linear.weight[gate * self.hidden_size : (gate + 1) * self.hidden_size])


class AdaLNSingleBlock(Block):
    """adaLN-single (PixArt-alpha, Chen et al. 2023, section 2.3): the six modulation vectors
    S = [shift1, scale1, gate1, shift2, scale2, gate2] come from ONE MLP shared by all blocks
    (``shared_conditioning``); block i adds its own learned table E_i (6, D) (their
    ``scale_shift_table``, init randn / sqrt(D)): S_i = S + E_i. Gate rows of E_i and of the shared
    MLP start at zero, so every block starts as the identity.

    Class conditioning: PixArt is text-to-image (text through cross-attention, only t into
    adaLN-single); with class labels and no cross-attention we feed t_emb + y_emb, as adaLN does.
    The final layer is PixArt's: LN, then shift/scale = E_final (2, D) + c (no MLP), zero Linear."""

    name = "adaln_single"

    GATES: ClassVar[tuple[int, int]] = (2, 5)  # rows of S that are gates

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, config.hidden_size))
        self.norm1 = ModulatedNorm(config.norm, config.norm_eps)
        self.norm2 = ModulatedNorm(config.norm, config.norm_eps)

    condition = staticmethod(AdaLNBlock.condition)

    @staticmethod
    def shared_conditioning(config: DiTConfig) -> nn.Module:
        return SharedModulation(config.hidden_size)

    @staticmethod
    def final_layer(config: DiTConfig) -> nn.Module:
        return AdaLNSingleFinalLayer(config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s = c + self.scale_shift_table  # (N, 6, D): c is the shared MLP's output
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = s.unbind(1)
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x, shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x, shift_mlp, scale_mlp))

    def initialize_conditioning(self) -> None:
        d = self.scale_shift_table.shape[1]
        with torch.no_grad():
            self.scale_shift_table.normal_().div_(math.sqrt(d))
            self.scale_shift_table[list(self.GATES)] = 0


class AdaLNSingleFinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: norm, shift/scale = scale_shift_table (2, D) + c, Linear (zero-init)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm_final = ModulatedNorm(config.norm, 1e-6)
        self.linear = decoder(config)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, config.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + c.unsqueeze(1)).unbind(1)  # (N, D) each
        return self.linear(self.norm_final(x, shift, scale))

    def initialize_conditioning(self) -> None:
        with torch.no_grad():
            self.scale_shift_table.normal_().div_(math.sqrt(self.scale_shift_table.shape[1]))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
