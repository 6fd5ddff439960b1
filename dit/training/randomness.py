"""Training randomness that does not depend on the number of processes or on resuming.

Each (step, micro-step) gets a generator seeded from (seed, step, micro-step), identical on every
rank. Random tensors are drawn for the whole global micro-batch and each rank keeps its slice, so
sample k of a global batch gets the same timestep, noise, label drop and flip whether the run has
1 or 8 processes, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch


class SlicedRandom:
    def __init__(self, seed: int, step: int, micro_step: int, world_size: int, rank: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + micro_step)
        self.world_size, self.rank, self.device = world_size, rank, device

    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank * n : (self.rank + 1) * n]

    def rand(self, n: int) -> torch.Tensor:
        return self._slice(torch.rand(n * self.world_size, generator=self.generator, device=self.device), n)

    def randn(self, shape) -> torch.Tensor:
        n, *rest = shape
        return self._slice(torch.randn(n * self.world_size, *rest, generator=self.generator, device=self.device), n)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return self._slice(torch.randint(high, (n * self.world_size,), generator=self.generator, device=self.device), n)
