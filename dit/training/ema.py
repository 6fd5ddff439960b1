"""Exponential moving average of the weights, in fp32 (DiT: decay 0.9999, every step)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """ema = decay * ema + (1 - decay) * param over trainable parameters only; frozen buffers (the
    position embedding) are copied, not averaged. warmup=True uses min(decay, (1 + n) / (10 + n))
    for short runs, where 0.9999 would average over far more steps than the run has."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        ema_params, params = [], []
        for (name, p_ema), (name2, p) in zip(self.model.named_parameters(), model.named_parameters()):
            assert name == name2, (name, name2)
            if p.requires_grad:
                ema_params.append(p_ema)
                # Under FSDP2 the live parameters are sharded DTensors: gather them (all ranks call this).
                full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
                params.append(full.float())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        self.num_updates += 1
