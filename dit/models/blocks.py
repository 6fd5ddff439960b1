"""The four conditioning variants of the DiT paper (section 3.2, Figure 3), one class each, one registry.

Every block has the same signature, ``forward(x, c) -> x`` with x: (N, T, D). What ``c`` is, whether
extra tokens ride along in x, and which final layer decodes the tokens are decided by small static
hooks on the class, so the backbone is one loop with no branching on the variant:

    c = Block.condition(t_emb, y_emb)
    x = Block.add_tokens(x, c)
    for block in blocks: x = block(x, c)
    x = Block.remove_tokens(x)
    x = final_layer(x, c)

Adding a variant = one class here with ``@register_block``, nothing else.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp

from dit.ops import layernorm_modulate

__all__ = ["BLOCKS", "register_block", "get_block", "DiTBlock", "Attention", "CrossAttention"]

BLOCKS: dict[str, type[DiTBlock]] = {}


def register_block(name: str):
    """Class decorator: make a conditioning variant selectable as ``model.block=<name>``."""

    def wrap(cls):
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice")
        cls.name = name
        BLOCKS[name] = cls
        return cls

    return wrap


def get_block(name: str) -> type[DiTBlock]:
    """The block class registered as ``name``; a clear error listing the valid names otherwise."""
    try:
        return BLOCKS[name]
    except KeyError:
        raise ValueError(f"unknown block {name!r}; valid blocks: {', '.join(sorted(BLOCKS))}") from None


#################################################################################
#                          Attention and MLP sub-layers                         #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention.

    Parameter names and the qkv layout (3, heads, head_dim) are timm's, which the released DiT
    checkpoints use.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to the conditioning tokens (keys, values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "n t (h d) -> n h t d", h=self.num_heads)  # (N, H, T, D/H)
        k, v = rearrange(self.kv(context), "n s (two h d) -> two n h s d", two=2, h=self.num_heads)  # (N, H, S, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


def mlp(dim: int, mlp_ratio: float) -> Mlp:
    """Pointwise feed-forward, GELU (tanh approximation) as in the DiT code; names fc1/fc2 as timm's."""
    return Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))


#################################################################################
#                                 Final layers                                  #
#################################################################################


class FinalLayer(nn.Module):
    """LayerNorm + linear decoder of each token into a p x p x C_out patch (token-conditioned variants)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # (N, T, p*p*C_out)

    def initialize_conditioning(self) -> None:
        """Nothing variant-specific."""


class AdaLNFinalLayer(nn.Module):
    """Adaptive LayerNorm (shift, scale regressed from c) + linear decoder; zero_init for adaLN-Zero."""

    fused_adaln: str = "auto"  # set by DiT.set_fused_adaln; the fused kernel does not change the state dict

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, zero_init: bool):
        super().__init__()
        self.norm_eps = 1e-6
        self.zero_init = zero_init
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(layernorm_modulate(x, shift, scale, self.norm_eps, self.fused_adaln))  # (N, T, p*p*C_out)

    def initialize_conditioning(self) -> None:
        """adaLN-Zero: the modulation and the output projection start at zero, so the model outputs 0."""
        if self.zero_init:
            for layer in (self.adaLN_modulation[-1], self.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)


#################################################################################
#                           Conditioning block variants                         #
#################################################################################


class DiTBlock(nn.Module):
    """Base class: a transformer block conditioned on the timestep and class embeddings."""

    name: ClassVar[str]
    fused_adaln: str = "auto"  # LayerNorm + modulate through the Triton kernel: auto | true | false

    @staticmethod
    def condition(t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        """What every block receives as c. Default: the two embeddings as a (N, 2, D) token sequence."""
        return torch.stack([t_emb, y_emb], dim=1)

    @staticmethod
    def add_tokens(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Hook before the first block (in-context conditioning appends tokens here)."""
        return x

    @staticmethod
    def remove_tokens(x: torch.Tensor) -> torch.Tensor:
        """Hook after the last block: give back only the image tokens."""
        return x

    @staticmethod
    def final_layer(hidden_size: int, patch_size: int, out_channels: int) -> nn.Module:
        """The decoder that matches this variant (paper: 'adaptive if using adaLN')."""
        return FinalLayer(hidden_size, patch_size, out_channels)

    def initialize_conditioning(self) -> None:
        """Variant-specific initialisation, run by DiT.initialize_weights after the generic one."""


@register_block("in_context")
class InContextBlock(DiTBlock):
    """In-context conditioning: t and c are two extra tokens in the sequence, treated like image
    tokens by a standard ViT block, and removed after the last block (like a ViT cls token)."""

    num_extra_tokens: ClassVar[int] = 2

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_eps = norm_eps
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = mlp(hidden_size, mlp_ratio)

    @staticmethod
    def add_tokens(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, x], dim=1)  # (N, 2 + T, D)

    @staticmethod
    def remove_tokens(x: torch.Tensor) -> torch.Tensor:
        return x[:, InContextBlock.num_extra_tokens :]  # (N, T, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_block("cross_attn")
class CrossAttentionBlock(DiTBlock):
    """Cross-attention conditioning: t and c form a length-2 sequence apart from the image tokens; a
    multi-head cross-attention layer after self-attention reads it (the most Gflops, ~15% more)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_eps = norm_eps
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), c)  # c: (N, 2, D)
        return x + self.mlp(self.norm3(x))


@register_block("adaln")
class AdaLNBlock(DiTBlock):
    """Adaptive layer norm: the LayerNorms' scale and shift (gamma, beta) are regressed from t + c,
    the same for every token (the fewest Gflops)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_eps = norm_eps
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))

    @staticmethod
    def condition(t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        return t_emb + y_emb  # (N, D)

    @staticmethod
    def final_layer(hidden_size: int, patch_size: int, out_channels: int) -> nn.Module:
        return AdaLNFinalLayer(hidden_size, patch_size, out_channels, zero_init=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)  # (N, D) each
        x = x + self.attn(layernorm_modulate(x, shift_msa, scale_msa, self.norm_eps, self.fused_adaln))
        return x + self.mlp(layernorm_modulate(x, shift_mlp, scale_mlp, self.norm_eps, self.fused_adaln))


@register_block("adaln_zero")
class AdaLNZeroBlock(DiTBlock):
    """adaLN-Zero: adaLN plus dimension-wise gates alpha before each residual connection; the
    modulation MLP is zero-initialised so alpha = 0 and the block starts as the identity.
    Parameter names, shapes and chunk order are those of the released DiT checkpoints."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_eps = norm_eps
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    condition = staticmethod(AdaLNBlock.condition)

    @staticmethod
    def final_layer(hidden_size: int, patch_size: int, out_channels: int) -> nn.Module:
        return AdaLNFinalLayer(hidden_size, patch_size, out_channels, zero_init=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(layernorm_modulate(x, shift_msa, scale_msa, self.norm_eps, self.fused_adaln))
        return x + gate_mlp.unsqueeze(1) * self.mlp(layernorm_modulate(x, shift_mlp, scale_mlp, self.norm_eps, self.fused_adaln))

    def initialize_conditioning(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
