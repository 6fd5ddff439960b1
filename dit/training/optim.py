"""The optimisers ``optim=`` chooses, and the learning-rate schedule: AdamW (DiT's), or Muon for the transformer
blocks' weight matrices with AdamW for every other parameter (as in recent diffusion and language-model speedruns).

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each 2-D weight's momentum by Newton-Schulz iterations.
It is for hidden matrices only: the patch embedding (a 4-D convolution), the timestep and label embedders, the final
layer, biases and norms stay with AdamW. With ``muon_adjust_lr: match_rms_adamw`` (Moonshot's scaling, the default)
its updates have AdamW's RMS, so both use the same ``lr`` and ``weight_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch's Muon, pinned in requirements.lock
from torch.utils.flop_counter import FlopCounterMode

from dit.registry import Registry

__all__ = [
    "OPTIMIZERS",
    "AdamW",
    "FullMatrixMuon",
    "Muon",
    "MuonWithAdamW",
    "build_optimizer",
    "lr_at",
    "newton_schulz_cpu",
    "muon_parameter",
    "optimizer_flops",
]


def lr_at(step: int, total_steps: int, o) -> float:
    """Learning rate after `step` optimiser steps (o: OptimConfig): warm-up, then constant / cosine / linear decay."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def muon_parameter(name: str, param: torch.Tensor) -> bool:
    """Muon's share: the 2-D weight matrices inside the transformer blocks (attention, MLP, modulation), wherever
    the DiT sits in the trained module (a training add-on may wrap it; what the add-on trains outside the blocks,
    such as a projector, stays with AdamW)."""
    return "blocks" in name.split(".")[:-1] and param.ndim == 2


def _evaluate(closure: Callable | None):
    """torch.optim's closure convention: the loss recomputed with gradients, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def newton_schulz_cpu(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """torch.optim._muon._zeropower_via_newtonschulz's quintic iteration in bfloat16, step for step, with each product
    computed in float32 from bfloat16 values and rounded to bfloat16 as a native bfloat16 product is: the same
    arithmetic (up to the order of the float32 sums) without bfloat16 matrix kernels, which CPUs without native
    bfloat16 (AVX2 only, e.g. AMD EPYC) emulate slowly (make train's Muon steps: 40 s instead of under one). Not plain
    float32: torch's bfloat16 rounding is part of what Muon does (it lifts the gradient's small singular values that
    five exact iterations would leave near zero)."""
    a, b, c = coefficients

    def bf16(x):
        return x.to(torch.bfloat16).float()

    x = bf16(grad.float())
    if grad.size(0) > grad.size(1):
        x = x.T
    x = bf16(x / bf16(x.norm().clamp(min=eps)))  # spectral norm at most 1
    for _ in range(steps):
        gram = bf16(x @ x.T)
        update = bf16(torch.addmm(gram, gram, gram, beta=b, alpha=c))
        x = bf16(torch.addmm(x, update, x, beta=a))
    return (x.T if grad.size(0) > grad.size(1) else x).to(torch.bfloat16)


class FullMatrixMuon(torch.optim.Muon):
    """torch.optim.Muon, whose Newton-Schulz step sees the whole matrix when FSDP2 shards it (a DTensor): the
    update is gathered, orthogonalised, and sharded again, so each rank applies its rows of one process's update
    (orthogonalising a shard is not orthogonalising the matrix). Unsharded, each step is torch's own (on CPU its
    Newton-Schulz iteration with float32 products rounded as bfloat16 ones: newton_schulz_cpu)."""

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            for p, grad, buf in zip(params, grads, bufs):  # torch.optim._muon._single_tensor_muon's steps
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = self.orthogonalise(update, group)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss

    @staticmethod
    def orthogonalise(update: torch.Tensor, group: dict) -> torch.Tensor:
        def newton_schulz(m):
            if m.device.type == "cpu":  # torch's bfloat16 products, which CPUs without native bf16 emulate slowly
                return newton_schulz_cpu(m, group["ns_coefficients"], group["ns_steps"], group["eps"])
            return _zeropower_via_newtonschulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"])

        if isinstance(update, DTensor):
            return distribute_tensor(newton_schulz(update.full_tensor()), update.device_mesh, update.placements)
        return newton_schulz(update)

    def flops_per_step(self) -> float:
        """The matrix FLOPs of one step on one process: every matrix's Newton-Schulz iterations (each process runs
        them on the whole matrix, sharded or not), counted on the meta device; the elementwise work is left out."""
        with FlopCounterMode(display=False) as counter:
            for group in self.param_groups:
                for p in group["params"]:
                    self.orthogonalise(torch.empty(p.shape, device="meta"), group)
        return float(counter.get_total_flops())


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on some parameters and torch.optim.AdamW on the others, as ONE optimiser: one list of
    param groups (each tagged ``kind``) for the learning-rate schedule, one standard state dict for checkpoints
    (Accelerate, FSDP2's distributed state dict). The two torch optimisers do the steps, on views of these groups
    and this state."""

    def __init__(self, muon: FullMatrixMuon, adamw: torch.optim.AdamW):
        groups = [dict(g, kind="muon") for g in muon.param_groups] + [dict(g, kind="adamw") for g in adamw.param_groups]
        super().__init__(groups, defaults={})
        self.engines = {"muon": muon, "adamw": adamw}
        self._bind()

    def _bind(self) -> None:
        """Point the engines at this optimiser's groups and state (again after load_state_dict replaced them)."""
        for kind, engine in self.engines.items():
            engine.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            engine.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._bind()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = _evaluate(closure)
        for engine in self.engines.values():
            engine.step()
        return loss

    def flops_per_step(self) -> float:
        return sum(optimizer_flops(engine) for engine in self.engines.values())


def optimizer_flops(optimizer: torch.optim.Optimizer) -> float:
    """Matrix FLOPs of one optimiser step on one process (Muon's Newton-Schulz); 0 for an optimiser whose step is
    elementwise only (AdamW: a few FLOPs per parameter, nothing beside a training step's)."""
    flops = getattr(optimizer, "flops_per_step", None)
    return flops() if flops is not None else 0.0


class AdamW:
    """DiT's optimiser over every trainable parameter."""

    name: ClassVar[str] = "adamw"

    @staticmethod
    def build(model: torch.nn.Module, o) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class Muon:
    """Muon on the blocks' weight matrices (muon_parameter), AdamW on the rest, as one optimiser."""

    name: ClassVar[str] = "muon"

    @staticmethod
    def build(model: torch.nn.Module, o) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrices = [p for n, p in named if muon_parameter(n, p)]
        others = [p for n, p in named if not muon_parameter(n, p)]
        if not matrices:
            raise ValueError("optim=muon: the model has no 2-D weights in its blocks for Muon")
        muon = FullMatrixMuon(
            matrices,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.muon_momentum,
            nesterov=True,
            ns_steps=o.muon_ns_steps,
            adjust_lr_fn=getattr(o.muon_adjust_lr, "value", o.muon_adjust_lr),
        )
        adamw = torch.optim.AdamW(others, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        return MuonWithAdamW(muon, adamw)


# optim.name -> the class that builds it from the model and the OptimConfig (adding one: a class, one entry)
OPTIMIZERS: Registry = Registry("optimizer", [AdamW, Muon])


def build_optimizer(model: torch.nn.Module, o) -> torch.optim.Optimizer:
    """The optimiser ``o.name`` names (OptimConfig, configs/optim/) over the model's trainable parameters."""
    return OPTIMIZERS[getattr(o.name, "value", o.name)].build(model, o)
