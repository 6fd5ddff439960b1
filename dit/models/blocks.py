"""Conditioning blocks, one class each, one registry: the four variants of the DiT paper (section 3.2,
Figure 3), three from later work (DiffiT's TMSA, PixArt-alpha's adaLN-single, AdaIN), and the normalisation
arms around adaLN-Zero's modulation (NormalisedBlock: AdaIN, conditional BatchNorm, AdaGN, FiLM), and SPADE for a
spatial condition map (dit/models/spatial.py).

Every block has the same signature, ``forward(x, c) -> x`` with x: (N, T, D). What ``c`` is, whether
extra tokens ride along in x, which final layer decodes the tokens, and whether one module shared by
all blocks turns c into what the blocks read, are decided by small static hooks on the class, so the
backbone is one loop with no branching on the variant:

    c = Block.condition(t_emb, y_emb)
    c_blocks = shared(c)                      # shared = Block.shared_conditioning(D); identity by default
    x = Block.add_tokens(x, c)
    for block in blocks: x = block(x, c_blocks)
    x = Block.remove_tokens(x)
    x = final_layer(x, c)                     # final_layer = Block.final_layer(config)

Adding a variant = one class here and its line in ``BLOCKS`` at the end (docs/extending.md). Every block
is built from the model's ``DiTConfig``, which also carries the backbone options orthogonal to the variant
(the norm, q/k RMSNorm, the MLP, RoPE).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, SwiGLU

from dit.models import config as model_config
from dit.models.config import DiTConfig
from dit.ops import NORMS, check_mode, resolve_modulate
from dit.registry import Registry

__all__ = [
    "BLOCKS",
    "MLPS",
    "NORMS",
    "POS_EMBEDS",
    "Attention",
    "CrossAttention",
    "Block",
    "DiTBlock",
    "RoPE2d",
    "TimeDependentAttention",
    "get_block",
    "set_fused_adaln",
    "swiglu_hidden_size",
]

MLPS = tuple(model_config.Mlp.__members__)
POS_EMBEDS = tuple(model_config.PosEmbed.__members__)


#################################################################################
#                     Norms, attention and MLP sub-layers                       #
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


class InstanceNormModulate(nn.Module):
    """AdaIN on tokens: each channel normalised over the T tokens of its own sample (instance
    statistics, Huang & Belongie 2017 eq. 8, with the image's spatial axis = the token axis), then
    x_hat * (1 + scale) + shift. Not LayerNorm: statistics are per (sample, channel), not per token."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)  # (N, 1, D)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class BatchNormModulate(nn.Module):
    """Conditional BatchNorm on tokens (de Vries et al. 2017; BigGAN): each channel normalised by its mean and
    variance over the whole batch and every token (N x T values), then x_hat * (1 + scale) + shift. The
    statistics are dit.nn.ConditionalBatchNorm2d's with the token axis as the spatial one.

    Training: the batch's statistics, synchronised over the processes of a distributed run (one differentiable
    all-reduce of per-channel sums, so 2 processes x 8 images normalise exactly as 1 x 16 would), and the running
    statistics (momentum 0.1, unbiased variance, as torch's BatchNorm) updated. Evaluation (sampling, FID): the
    running statistics, so a sample does not depend on the others in its batch, nor on classifier-free guidance
    doubling the batch with unconditional copies. Gradient accumulation: statistics per micro-batch."""

    def __init__(self, dim: int, eps: float, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, biased variance (in fp32 at least: bf16 autocast too) and count over every process's tokens."""
        import torch.distributed as dist

        flat = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, x.shape[-1])
        count = torch.full((1,), float(flat.shape[0]), device=x.device, dtype=flat.dtype)
        sums = torch.cat([flat.sum(0), flat.square().sum(0), count])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import warnings

            from torch.distributed.nn.functional import all_reduce  # differentiable: gradients flow to every rank

            with warnings.catch_warnings():  # deprecated in favour of _functional_collectives; the autograd one
                warnings.simplefilter("ignore", FutureWarning)
                sums = all_reduce(sums)
        d = x.shape[-1]
        n = sums[-1]
        mean = sums[:d] / n
        return mean, (sums[d : 2 * d] / n - mean.square()).clamp_min(0), n

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, n = self.batch_statistics(x)
            with torch.no_grad():
                buffers = self.running_mean.dtype
                self.running_mean.lerp_(mean.detach().to(buffers), self.momentum)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp_min(1)).to(buffers), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = ((x.to(mean.dtype) - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return x_hat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"batch statistics, eps={self.eps}, momentum={self.momentum}"


class GroupNormModulate(nn.Module):
    """AdaGN on tokens (ADM, Dhariwal & Nichol 2021, moved into the transformer): the channels of each token in
    `groups` groups, each normalised by its own mean and variance (torch's group_norm on the token as an image of
    one pixel), then x_hat * (1 + scale) + shift. groups=1 is LayerNorm without affine."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"model.norm_groups={groups} must divide the width {dim}")
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x_hat = F.group_norm(x.reshape(-1, x.shape[-1]), self.groups, eps=self.eps).reshape(x.shape)
        return x_hat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}"


class FiLMModulate(nn.Module):
    """FiLM (Perez et al. 2018) with no normalisation at all: x * (1 + scale) + shift (dit.nn.FiLM's formula)."""

    def __init__(self, *_):
        super().__init__()

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def set_fused_adaln(module: nn.Module, mode: str | bool) -> str:
    """Route every modulated LayerNorm/RMSNorm under ``module`` through the fused kernel or not:
    "auto" | "true" | "false". Returns the normalised mode. The state dict does not change."""
    mode = check_mode(mode)
    for m in module.modules():
        if isinstance(m, ModulatedNorm):
            m.set_fused(mode)
    return mode


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


def self_attention(config: DiTConfig, num_prefix_tokens: int = 0) -> Attention:
    """The blocks' self-attention with the backbone options applied."""
    return Attention(config.hidden_size, config.num_heads, config.qk_norm, _rope(config, num_prefix_tokens))


def _rope(config: DiTConfig, num_prefix_tokens: int = 0) -> RoPE2d | None:
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


#################################################################################
#                           Conditioning block variants                         #
#################################################################################


class NoSharedConditioning(nn.Identity):
    """The blocks read c as it is (every variant but adaLN-single)."""

    def initialize_conditioning(self) -> None:
        """Nothing to initialise."""


class Block(nn.Module):
    """Base class of the conditioning variants: a transformer block conditioned on the timestep and class
    embeddings. (DiTBlock, as in the official code, is the adaLN-Zero block below.)"""

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


#################################################################################
#                        Variants from later work                               #
#################################################################################


DiTBlock = AdaLNZeroBlock  # the official DiT code's name for its block (models.py: DiTBlock is adaLN-Zero)


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
        rope = _rope(config)
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


class NormalisedBlock(Block):
    """adaLN-Zero's modulation (shift, scale and gate regressed from c, zero-initialised: identity at init) around
    a parameter-free normalisation whose statistics are the variant's (``make_norm``), in the blocks and the final
    layer alike. Everything else is adaLN-Zero's, so comparing these blocks compares the statistics alone: the
    normalisation design space of the conditioning lineage (BatchNorm -> CBN, GroupNorm -> AdaGN, InstanceNorm ->
    AdaIN, none -> FiLM; LayerNorm -> adaLN-Zero itself). model.norm does not apply (only layernorm, the default,
    is accepted); there is no fused kernel for these norms (fused_adaln ignores them)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.norm != "layernorm":
            raise ValueError(
                f"block {self.name} normalises with {self.statistics}; norm={config.norm!r} does not apply "
                "(leave norm=layernorm, the default)"
            )
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * config.hidden_size))
        self.norm1 = self.make_norm(config, config.norm_eps)
        self.norm2 = self.make_norm(config, config.norm_eps)

    @staticmethod
    def make_norm(config: DiTConfig, eps: float) -> nn.Module:
        """The block's normalisation: forward(x, shift, scale) -> x_hat * (1 + scale) + shift."""
        raise NotImplementedError

    condition = staticmethod(AdaLNBlock.condition)

    @classmethod
    def final_layer(cls, config: DiTConfig) -> nn.Module:
        return AdaLNFinalLayer(config, True, cls.make_norm(config, 1e-6))

    forward = AdaLNZeroBlock.forward
    initialize_conditioning = AdaLNZeroBlock.initialize_conditioning


class AdaINBlock(NormalisedBlock):
    """AdaIN (Huang & Belongie 2017) carried into the transformer: each channel is normalised over the
    tokens of its own sample (instance statistics over T, not LayerNorm over D), then shifted and
    scaled from c, and gated, as adaLN-Zero."""

    name = "adain"
    statistics = "instance statistics over the tokens"

    @staticmethod
    def make_norm(config: DiTConfig, eps: float) -> nn.Module:
        return InstanceNormModulate(eps)


class CBNBlock(NormalisedBlock):
    """Conditional BatchNorm: each channel normalised over the batch and the tokens (BatchNormModulate: running
    statistics at sampling time, synchronised over processes in training)."""

    name = "cbn"
    statistics = "batch statistics"

    @staticmethod
    def make_norm(config: DiTConfig, eps: float) -> nn.Module:
        return BatchNormModulate(config.hidden_size, eps)


class AdaGNBlock(NormalisedBlock):
    """AdaGN (ADM's adaptive GroupNorm) in the transformer: each token's channels in model.norm_groups groups."""

    name = "adagn"
    statistics = "group statistics over each token's channels"

    @staticmethod
    def make_norm(config: DiTConfig, eps: float) -> nn.Module:
        return GroupNormModulate(config.hidden_size, config.norm_groups, eps)


class FiLMBlock(NormalisedBlock):
    """FiLM: adaLN-Zero's scale, shift and gate on tokens that are not normalised at all (is the norm doing
    anything?)."""

    name = "film"
    statistics = "no statistics (no normalisation)"

    @staticmethod
    def make_norm(config: DiTConfig, eps: float) -> nn.Module:
        return FiLMModulate()


class SpatialModulation(nn.Module):
    """SPADE's modulation network (Park et al. 2019, section 3) on tokens: the map, resized (nearest) to r cells per
    token side (r = map_size / grid, at least 1), through a shared 3x3 convolution + ReLU at that resolution, then
    one convolution of kernel = stride = r to ``out`` channels per token: (N, C_m, s, s) -> (N, T, out). The output
    convolution starts at zero, so the block starts as adaLN-Zero (and the identity)."""

    HIDDEN = 32  # SPADE's nhidden is 128 at 256 channels; 32 keeps it below adaLN's 6 D^2 per block at DiT widths

    def __init__(self, config: DiTConfig, out: int):
        super().__init__()
        from dit.models.spatial import MAPS

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


# The conditioning variants, selectable as model.block=<name>: one line per class.
BLOCKS: Registry[Block] = Registry(
    "block",
    [
        InContextBlock,
        CrossAttentionBlock,
        AdaLNBlock,
        AdaLNZeroBlock,
        DiffiTBlock,
        AdaLNSingleBlock,
        AdaINBlock,
        CBNBlock,
        AdaGNBlock,
        FiLMBlock,
        SPADEBlock,
    ],  # fmt: skip
)


def get_block(name: str) -> type[Block]:
    """The block class registered as ``name``; a clear error listing the valid names otherwise."""
    return BLOCKS[name]
