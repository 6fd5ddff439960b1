"""What every conditioning block shares: the base class ``Block`` and its hooks, the builders of a block's
sub-layers with the backbone options applied (self_attention, block_norm, block_mlp), and the final layers that
decode the tokens into patches."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from dit.models.blocks.layers import Attention, RoPE2d, make_mlp, make_norm
from dit.models.config import DiTConfig

__all__ = [
    "AdaLNFinalLayer",
    "Block",
    "FinalLayer",
    "NoSharedConditioning",
    "block_mlp",
    "block_norm",
    "block_rope",
    "decoder",
    "self_attention",
]


class Block(nn.Module):
    """Base class of the conditioning variants: a transformer block conditioned on the timestep and class
    embeddings. (DiTBlock, as in the official code, is the adaLN-Zero block of paper.py.)"""

    name: ClassVar[str]
    num_extra_tokens: ClassVar[int] = 0  # tokens add_tokens prepends (not on the grid: RoPE skips them)
    # Why TREAD token routing (routing.py) cannot run a subset of the tokens through this block, or None.
    routing_refusal: ClassVar[str | None] = None
    # The statistics the block's own normalisation takes (NormalisedBlock), or None: it uses model.norm.
    statistics: ClassVar[str | None] = None
    # Whether the block reads a spatial condition map beside c (c = (c, map): model.map_input=blocks; SPADE), and
    # the model settings it cannot be built without (the zoo's counts and the tests build it with them).
    reads_map: ClassVar[bool] = False
    needs: ClassVar[dict] = {}

    @staticmethod
    def condition(t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        """What every block receives as c. Default: the two embeddings as a (N, 2, D) token sequence."""
        return torch.stack([t_emb, y_emb], dim=1)

    @staticmethod
    def shared_conditioning(config: DiTConfig) -> nn.Module:
        """A module the DiT owns once and applies to c before the blocks (adaLN-single's shared MLP).
        Default: the identity, no parameters, no state-dict keys."""
        return NoSharedConditioning()

    @staticmethod
    def add_tokens(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Hook before the first block (in-context conditioning appends tokens here)."""
        return x

    @staticmethod
    def remove_tokens(x: torch.Tensor) -> torch.Tensor:
        """Hook after the last block: give back only the image tokens."""
        return x

    @staticmethod
    def final_layer(config: DiTConfig) -> nn.Module:
        """The decoder that matches this variant (paper: 'adaptive if using adaLN')."""
        return FinalLayer(config)

    def initialize_conditioning(self) -> None:
        """Variant-specific initialisation, run by DiT.initialize_weights after the generic one."""


class NoSharedConditioning(nn.Identity):
    """The blocks read c as it is (every variant but adaLN-single)."""

    def initialize_conditioning(self) -> None:
        """Nothing to initialise."""


#################################################################################
#                 A block's sub-layers, with the backbone options                #
#################################################################################


def self_attention(config: DiTConfig, num_prefix_tokens: int = 0) -> Attention:
    """The blocks' self-attention with the backbone options applied."""
    return Attention(config.hidden_size, config.num_heads, config.qk_norm, block_rope(config, num_prefix_tokens))


def block_rope(config: DiTConfig, num_prefix_tokens: int = 0) -> RoPE2d | None:
    """The rotary embedding of the blocks' attention (pos_embed=rope), or None (sincos: added once, before them)."""
    if config.pos_embed != "rope":
        return None
    return RoPE2d(config.hidden_size // config.num_heads, config.grid_size, num_prefix_tokens)


def block_norm(config: DiTConfig, affine: bool = True) -> nn.Module:
    """A block's own (unmodulated) norm: the configured kind over the channels, the blocks' eps."""
    return make_norm(config.norm, config.hidden_size, config.norm_eps, affine)


def block_mlp(config: DiTConfig) -> nn.Module:
    return make_mlp(config.mlp, config.hidden_size, config.mlp_ratio)


#################################################################################
#                                 Final layers                                  #
#################################################################################


def decoder(config: DiTConfig) -> nn.Linear:
    """The final layers' linear decoder of each token into a p x p x C_out patch."""
    return nn.Linear(config.hidden_size, config.patch_size * config.patch_size * config.out_channels)


class FinalLayer(nn.Module):
    """Norm (LayerNorm or RMSNorm, affine) + linear decoder of each token into a p x p x C_out patch."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm_final = make_norm(config.norm, config.hidden_size, eps=1e-6)
        self.linear = decoder(config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # (N, T, p*p*C_out)

    def initialize_conditioning(self) -> None:
        """Nothing variant-specific."""


class AdaLNFinalLayer(nn.Module):
    """Adaptive norm (shift, scale regressed from c) + linear decoder; zero_init for adaLN-Zero.
    ``norm_final`` is parameter-free (a ModulatedNorm, or AdaIN's instance norm)."""

    def __init__(self, config: DiTConfig, zero_init: bool, norm_final: nn.Module):
        super().__init__()
        self.zero_init = zero_init
        self.norm_final = norm_final
        self.linear = decoder(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 2 * config.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(self.norm_final(x, shift, scale))  # (N, T, p*p*C_out)

    def initialize_conditioning(self) -> None:
        """adaLN-Zero: the modulation and the output projection start at zero, so the model outputs 0."""
        if self.zero_init:
            for layer in (self.adaLN_modulation[-1], self.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
