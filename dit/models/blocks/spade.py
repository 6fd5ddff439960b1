"""SPADE (Park et al. 2019) in the transformer: a block whose modulation varies from token to token with a spatial
condition map (dit/models/spatial.py), read beside c (model.map_input=blocks)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dit.models.blocks.base import Block, block_mlp, self_attention
from dit.models.blocks.layers import make_norm
from dit.models.blocks.paper import AdaLNBlock, AdaLNZeroBlock
from dit.models.config import DiTConfig
from dit.models.spatial import MAPS

__all__ = ["SPADEBlock", "SpatialModulation"]


class SpatialModulation(nn.Module):
    """SPADE's modulation network (Park et al. 2019, section 3) on tokens: the map, resized (nearest) to r cells per
    token side (r = map_size / grid, at least 1), through a shared 3x3 convolution + ReLU at that resolution, then
    one convolution of kernel = stride = r to ``out`` channels per token: (N, C_m, s, s) -> (N, T, out). The output
    convolution starts at zero, so the block starts as adaLN-Zero (and the identity)."""

    HIDDEN = 32  # SPADE's nhidden is 128 at 256 channels; 32 keeps it below adaLN's 6 D^2 per block at DiT widths

    def __init__(self, config: DiTConfig, out: int):
        super().__init__()
        self.grid = config.grid_size
        self.cells = max(1, round(config.map_size / self.grid))  # map cells per token side
        self.shared = nn.Sequential(nn.Conv2d(MAPS[config.cond_map].channels, self.HIDDEN, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(self.HIDDEN, out, self.cells, stride=self.cells)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        side = self.grid * self.cells
        if m.shape[-1] != side or m.shape[-2] != side:
            m = F.interpolate(m, size=(side, side), mode="nearest")
        h = self.out(self.shared(m.to(self.out.weight.dtype)))  # (N, out, grid, grid)
        return rearrange(h, "n c h w -> n (h w) c")

    def initialize_conditioning(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)


class SPADEBlock(Block):
    """SPADE (Park et al. 2019) in the transformer: adaLN-Zero's six shift/scale/gate vectors from c, plus a
    spatially varying part per token predicted from the condition map by a small convolution (SpatialModulation):
    shift, scale and gate differ from token to token by where the token lies on the map. The norm is model.norm
    (LayerNorm: SPADE's batch statistics are the cbn block's question); the final layer is adaLN-Zero's."""

    name = "spade"
    reads_map = True
    needs: ClassVar[dict] = {"cond_map": "silhouette", "map_input": "blocks"}
    routing_refusal = "block spade modulates each token by its own place on the map"

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.spade = SpatialModulation(config, 6 * d)
        self.norm1 = make_norm(config.norm, d, config.norm_eps, affine=False)
        self.norm2 = make_norm(config.norm, d, config.norm_eps, affine=False)

    condition = staticmethod(AdaLNBlock.condition)
    final_layer = staticmethod(AdaLNZeroBlock.final_layer)

    def forward(self, x: torch.Tensor, c) -> torch.Tensor:
        c, m = c  # model.map_input=blocks: (c, map)
        mod = self.adaLN_modulation(c).unsqueeze(1) + self.spade(m).to(x.dtype)  # (N, T, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)

    def initialize_conditioning(self) -> None:
        AdaLNZeroBlock.initialize_conditioning(self)
        self.spade.initialize_conditioning()
