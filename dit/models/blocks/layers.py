"""The sub-layers the blocks are made of: norms (plain and modulated), MLPs, rotary positions and attention.

Each backbone option of DiTConfig is applied here, whatever the block: ``norm`` (make_norm, ModulatedNorm),
``mlp`` (make_mlp), ``pos_embed=rope`` (RoPE2d) and ``qk_norm`` (Attention). Parameter names are timm's, which the
released DiT checkpoints use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, SwiGLU

from dit.models import config as model_config
from dit.ops import resolve_modulate

__all__ = [
    "MLPS",
    "POS_EMBEDS",
    "Attention",
    "CrossAttention",
    "ModulatedNorm",
    "RoPE2d",
    "make_mlp",
    "make_norm",
    "swiglu_hidden_size",
]

MLPS = tuple(model_config.Mlp.__members__)
POS_EMBEDS = tuple(model_config.PosEmbed.__members__)


#################################################################################
#                                    Norms                                      #
#################################################################################


def make_norm(kind: str, dim: int, eps: float, affine: bool = True) -> nn.Module:
    """LayerNorm or RMSNorm over the channels (affine: a learned weight, and a bias for LayerNorm)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


class ModulatedNorm(nn.Module):
    """norm(x) * (1 + scale) + shift, shift/scale (N, D) per sample; no parameters, no state-dict keys.

    The fused-kernel choice is resolved to a plain function here, once (``set_fused``), not per call.
    """

    def __init__(self, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.set_fused("auto")

    def set_fused(self, mode: str) -> None:
        self.fn = resolve_modulate(self.kind, mode)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fn(x, shift, scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, eps={self.eps}"


#################################################################################
#                                     MLPs                                      #
#################################################################################


def swiglu_hidden_size(dim: int, mlp_ratio: float) -> int:
    """SwiGLU width with the parameters of a GELU MLP of width mlp_ratio * D: three D x h matrices
    instead of two D x 4D, so h = 2/3 * mlp_ratio * D, rounded half-up to a multiple of 8 (tensor-core
    friendly; exact for D = 384, 768, 1152 at ratio 4: 1024, 2048, 3072)."""
    return max(8, 8 * int(2 * mlp_ratio * dim / 3 / 8 + 0.5))


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    """gelu: fc1 -> GELU (tanh approximation, as the DiT code) -> fc2, timm names fc1/fc2.
    swiglu: fc2(SiLU(fc1_g(x)) * fc1_x(x)) (Shazeer 2020), timm's SwiGLU."""
    if kind == "swiglu":
        return SwiGLU(in_features=dim, hidden_features=swiglu_hidden_size(dim, mlp_ratio))
    return Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))


#################################################################################
#                            Positions and attention                            #
#################################################################################


class RoPE2d(nn.Module):
    """2-D axial rotary position embedding (Su et al. 2021, axial form as in EVA-02 / LightningDiT).

    The first half of each head's channels rotates with the token's row, the second half with its
    column; within each half, channel pairs (2j, 2j+1) rotate by pos * theta^(-2j / (head_dim / 2)).
    ``num_prefix_tokens`` leading tokens that are not on the grid (in-context t/y tokens) are left
    unrotated. cos/sin are non-persistent buffers: no state-dict keys, moved with the model.
    """

    def __init__(self, head_dim: int, grid_size: int, num_prefix_tokens: int = 0, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"pos_embed=rope needs a head dim divisible by 4, got {head_dim}")
        if grid_size < 1:
            raise ValueError("pos_embed=rope needs the grid size (DiTConfig.grid_size)")
        half = head_dim // 2
        freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim/4,)
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)  # (T, head_dim/2)
        angles = angles.repeat_interleave(2, dim=1)  # (T, head_dim): one angle per channel pair
        angles = torch.cat([angles.new_zeros(num_prefix_tokens, head_dim), angles])  # prefix: angle 0
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H, T, head_dim) -> rotated, same shape and dtype."""
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        return (x * self.cos + rotated * self.sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention.

    Parameter names and the qkv layout (3, heads, head_dim) are timm's, which the released DiT
    checkpoints use. Options: RMSNorm of q and k per head (``qk_norm``, learned weight, applied
    before RoPE as in LightningDiT) and a rotary embedding ``rope``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope: RoPE2d | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:  # only created when asked: the default state dict stays the official one
            self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
            self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, 3D) projections -> (N, T, D): q/k norm, RoPE, softmax(q k^T / sqrt(d) + bias) v, proj."""
        q, k, v = rearrange(qkv, "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (N, H, T, D/H)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x))


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
