"""Exponential moving average of the weights, in fp32 (DiT: decay 0.9999, every step)."""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """ema = decay * ema + (1 - decay) * param over trainable parameters, and over the buffers training changes
    (BatchNorm's running statistics); constant buffers (the position embedding) stay as they are.
    warmup=True uses min(decay, (1 + n) / (10 + n))
    for short runs, where 0.9999 would average over far more steps than the run has.

    Under FSDP2 (`shard_like` with the prepared model) each process averages only its own shard of
    every parameter, laid out like the live one, so the update needs no communication; `sync()`
    (collective) gathers the shards into `self.model` before it is used (samples, checkpoints)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shards: dict[str, DTensor] | None = None
        self.synced_at = 0  # num_updates when self.model last held the full EMA (sharded case)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def shard_like(self, model: torch.nn.Module) -> None:
        """Shard the EMA as `model`'s parameters are (a no-op for unsharded models). Call again after
        loading new weights into self.model (resume)."""
        live = dict(model.named_parameters())
        self.shards = {
            name: distribute_tensor(p_ema.detach().to(live[name].device), live[name].device_mesh, live[name].placements)
            for name, p_ema in self.model.named_parameters()
            if isinstance(live[name], DTensor) and live[name].requires_grad
        } or None
        self.synced_at = self.num_updates

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        own = self.shards or {}
        ema_params, params = [], []
        for (name, p_ema), (name2, p) in zip(self.model.named_parameters(), model.named_parameters()):
            assert name == name2, (name, name2)
            if not p.requires_grad:
                continue
            if name in own:
                ema_params.append(own[name].to_local())
                params.append(p.detach().to_local().float())
            else:
                ema_params.append(p_ema)
                # A DTensor without a shard here (shard_like not called): gather it (all ranks call this).
                params.append((p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()).float())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        # Buffers that training changes (block cbn's running statistics) are averaged alike, as timm's ModelEmaV2
        # does; the constant ones (the position embedding) stay what they are (lerp of equal values is exact).
        buffers = zip(self.model.buffers(), model.buffers())
        pairs = [(e, b.detach().float()) for e, b in buffers if e.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [b for _, b in pairs], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self) -> torch.nn.Module:
        """Collective under FSDP (every process calls it): the full EMA weights into self.model."""
        if self.shards and self.synced_at != self.num_updates:  # once per update, however many users
            params = dict(self.model.named_parameters())
            for name, shard in self.shards.items():
                params[name].copy_(shard.full_tensor())
            self.synced_at = self.num_updates
        return self.model
