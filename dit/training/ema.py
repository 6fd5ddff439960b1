"""Exponential moving average of the weights, in fp32 (DiT: decay 0.9999, every step), and beside it EDM2's
power-function EMA profiles, whose snapshots choose the EMA length after training (dit.phema)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from dit.phema import key_prefix, power_beta, save_snapshot, sigma_rel_to_gamma

POWER_FILE = "ema_power.safetensors"  # a checkpoint's power-function profiles (keys 'sigma_rel=<width>/<name>')


class EMA:
    """ema = decay * ema + (1 - decay) * param over trainable parameters, and over the buffers training changes
    (BatchNorm's running statistics); constant buffers (the position embedding) stay as they are.
    warmup=True uses min(decay, (1 + n) / (10 + n))
    for short runs, where 0.9999 would average over far more steps than the run has.

    Under FSDP2 (`shard_like` with the prepared model) each process averages only its own shard of
    every parameter, laid out like the live one, so the update needs no communication; `sync()`
    (collective) gathers the shards into `self.model` before it is used (samples, checkpoints)."""

    def __init__(
        self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False, power: Sequence[float] = ()
    ):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shards: dict[str, DTensor] | None = None
        self.synced_at = 0  # num_updates when self.model last held the full EMA (sharded case)
        # EDM2's power-function profiles of these relative widths, updated with this EMA (post-hoc EMA: dit.phema)
        self.profiles = [PowerProfile(model, sigma_rel) for sigma_rel in power]

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
        for profile in self.profiles:
            profile.shard_like(model)

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
        for profile in self.profiles:
            profile.update(model)

    @torch.no_grad()
    def sync(self) -> torch.nn.Module:
        """Collective under FSDP (every process calls it): the full EMA weights into self.model."""
        if self.shards and self.synced_at != self.num_updates:  # once per update, however many users
            params = dict(self.model.named_parameters())
            for name, shard in self.shards.items():
                params[name].copy_(shard.full_tensor())
            self.synced_at = self.num_updates
        for profile in self.profiles:
            profile.sync()
        return self.model

    def power_state(self) -> dict[str, torch.Tensor]:
        """Every profile's weights, keys 'sigma_rel=<width>/<name>' (a checkpoint's POWER_FILE); call sync() first."""
        return {key_prefix(p.sigma_rel) + k: v for p in self.profiles for k, v in p.model.state_dict().items()}

    def load_power_state(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """The profiles from a checkpoint's POWER_FILE (strict: every key of every profile), at num_updates."""
        for p in self.profiles:
            prefix = key_prefix(p.sigma_rel)
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            p.model.load_state_dict(own, strict=True)
            p.num_updates = num_updates

    def snapshot(self, run_dir: Path, step: int, is_main: bool) -> None:
        """Collective under FSDP: every profile's weights now -> run_dir/phema/step_XXXXXXX.safetensors (main)."""
        for p in self.profiles:
            p.sync()
        if is_main and self.profiles:
            save_snapshot(run_dir, step, self.num_updates, {p.sigma_rel: p.model.state_dict() for p in self.profiles})


class PowerProfile(EMA):
    """One power-function EMA profile (EDM2, Eq. 127): at update n the decay is (1 - 1/n)^(gamma + 1), gamma the
    exponent of relative width sigma_rel, so after n updates the EMA averages the weights with density
    proportional to (k / n)^gamma: a fixed fraction of the run, however long it is."""

    def __init__(self, model: torch.nn.Module, sigma_rel: float):
        super().__init__(model)
        self.sigma_rel, self.gamma = float(sigma_rel), sigma_rel_to_gamma(sigma_rel)

    def current_decay(self) -> float:
        return power_beta(self.gamma, self.num_updates + 1)
