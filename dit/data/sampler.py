"""Deterministic, resumable data order: a seeded permutation per epoch, cut into global batches,
each rank taking its slice of every global batch (so each process sees its own shard of every
epoch, and a run with more processes visits the same samples in the same global batches)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class GlobalBatchSampler:
    """Yields this rank's index lists for micro-batches, from (epoch, batch) onwards.

    One global batch = world_size * grad_accum micro-batches of batch_size; micro-batch m of rank r
    is chunk m * world_size + r of the global batch. The last incomplete global batch of an epoch is
    dropped, so every step sees exactly global_batch_size samples.
    """

    def __init__(
        self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, grad_accum: int = 1, seed: int = 0
    ):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.global_batch_size = batch_size * world_size * grad_accum
        if num_samples < self.global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {self.global_batch_size}"
            )
        self.batches_per_epoch = num_samples // self.global_batch_size
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at global batch `batch` of `epoch` (resume)."""
        self.epoch, self.start_batch = epoch, batch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        """Micro-batches of this rank, in order, forever (epochs roll over)."""
        epoch, batch = self.epoch, self.start_batch
        while True:
            perm = self.permutation(epoch)
            for b in range(batch, self.batches_per_epoch):
                global_batch = perm[b * self.global_batch_size : (b + 1) * self.global_batch_size]
                for m in range(self.grad_accum):
                    chunk = m * self.world_size + self.rank
                    yield global_batch[chunk * self.batch_size : (chunk + 1) * self.batch_size].tolist()
            epoch, batch = epoch + 1, 0
