"""Noise schedules and timestep respacing (Ho et al. 2020; Nichol & Dhariwal 2021, ADM)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["get_betas", "space_timesteps", "respace_betas"]


def get_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """float64 betas: "linear" (1e-4..0.02 at 1000 steps, scaled for other lengths) or "cosine"."""
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        # alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; betas capped at 0.999 (ADM eq. 17).
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown noise schedule {schedule!r}; valid: linear, cosine")


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """The original timesteps kept by a respaced sampler, ascending.

    spacing: "250" (or 250) keeps 250 steps evenly spread, first and last included (ADM); "ddim50"
    keeps every (num_timesteps // 50)-th step from 0 (DDIM's and diffusers' "leading" spacing);
    "10,15,20" splits the range into sections with that many steps each.
    """
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {count} evenly strided steps from {num_timesteps}")
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (spacing {spacing!r})")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the chain that visits only ``kept``: 1 - alpha_bar[t] / alpha_bar[previous kept t]."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept_ac = alphas_cumprod[kept]
    return 1.0 - kept_ac / np.concatenate([[1.0], kept_ac[:-1]])
