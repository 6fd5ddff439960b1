"""The normalisation arms around adaLN-Zero's modulation: AdaIN, conditional BatchNorm, AdaGN and FiLM, one block
each (NormalisedBlock), and the modulated norm each one normalises with (forward(x, shift, scale)).

These are the conditioning lineage's layers (BatchNorm -> CBN, GroupNorm -> AdaGN, InstanceNorm -> AdaIN, none ->
FiLM) carried onto tokens, the token axis taking the image's spatial one; their image-shaped forms, as the papers
write them, are the tests' reference (tests/helpers/conditional_norms.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dit.models.blocks.base import AdaLNFinalLayer, Block, block_mlp, self_attention
from dit.models.blocks.paper import AdaLNBlock, AdaLNZeroBlock
from dit.models.config import DiTConfig

# Builds without distributed support have no torch.distributed.nn; a single process never reduces.
if dist.is_available():
    from torch.distributed.nn.functional import all_reduce  # differentiable: gradients flow to every rank

__all__ = [
    "AdaGNBlock",
    "AdaINBlock",
    "BatchNormModulate",
    "CBNBlock",
    "FiLMBlock",
    "FiLMModulate",
    "GroupNormModulate",
    "InstanceNormModulate",
    "NormalisedBlock",
]


#################################################################################
#                    The norms: x_hat * (1 + scale) + shift                      #
#################################################################################


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
    statistics are ConditionalBatchNorm2d's (tests/helpers/conditional_norms.py) with the token axis as the
    spatial one.

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
        flat = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, x.shape[-1])
        count = torch.full((1,), float(flat.shape[0]), device=x.device, dtype=flat.dtype)
        sums = torch.cat([flat.sum(0), flat.square().sum(0), count])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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
    """FiLM (Perez et al. 2018) with no normalisation at all: x * (1 + scale) + shift (FiLM's formula, eq. 1)."""

    def __init__(self, *_):
        super().__init__()

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                  The blocks                                   #
#################################################################################


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
