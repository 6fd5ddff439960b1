"""TREAD token routing (Krause et al., ICCV 2025): during training, a random share of the image tokens skips a
contiguous run of blocks and rejoins the others after it. No parameters are added; sampling uses every token.

    routing = TokenRouting(ratio=0.5, start=2, end=-2)      # DiT-XL/2 in the paper: blocks 2 .. 25 see half the tokens
    route = routing.draw(rng, batch_size, model.num_tokens)  # from the step's randomness (exact resume)
    model(x, t, y, route=route)

Blocks ``start`` .. ``end - 1`` see the tokens kept by ``route.keep`` (plus any tokens the variant adds, such as
in-context's t and y tokens, which are never routed); the routed tokens carry their values from before block
``start`` and are put back in their places after block ``end - 1``. ``end`` counts from the last block when negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Route", "TokenRouting"]


class Route(NamedTuple):
    """One training step's routing: keep (N, K) indices of the image tokens that go through blocks [start, end)."""

    keep: torch.Tensor
    start: int
    end: int

    def split(self, x: torch.Tensor, num_extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E + T, D) -> the (N, E + K, D) tokens the routed blocks see, and the (N, T, D) image tokens held."""
        extra, image = x[:, :num_extra], x[:, num_extra:]
        index = self.keep.unsqueeze(-1).expand(-1, -1, image.shape[-1])
        return torch.cat([extra, image.gather(1, index)], dim=1), image

    def merge(self, x: torch.Tensor, held: torch.Tensor, num_extra: int) -> torch.Tensor:
        """The kept tokens, updated by the routed blocks, back in their places among the held ones."""
        extra, kept = x[:, :num_extra], x[:, num_extra:]
        index = self.keep.unsqueeze(-1).expand(-1, -1, kept.shape[-1])
        return torch.cat([extra, held.scatter(1, index, kept)], dim=1)


@dataclass
class TokenRouting:
    """``training.token_routing``: ratio = share of the image tokens routed past blocks [start, end); 0 = off."""

    ratio: float = 0.0
    start: int = 2
    end: int = -2

    @property
    def enabled(self) -> bool:
        return self.ratio > 0

    def span(self, depth: int) -> tuple[int, int]:
        """[start, end) as block indices of a model of this depth."""
        return self.start, self.end + depth if self.end < 0 else self.end

    def check(self, model) -> None:
        """A clear error where routing cannot apply: a bad ratio or span, or a model whose blocks use the
        position of every token on the grid (RoPE, DiffiT's relative position bias)."""
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"training.token_routing.ratio={self.ratio}: need 0 <= ratio < 1 (the share routed)")
        if not self.enabled:
            return
        start, end = self.span(len(model.blocks))
        if not 0 <= start < end <= len(model.blocks):
            raise ValueError(
                f"training.token_routing start={self.start}, end={self.end}: need 0 <= start < end <= depth "
                f"({len(model.blocks)}; a negative end counts from the last block)"
            )
        reason = model.routing_refusal()
        if reason:
            raise ValueError(f"training.token_routing cannot route tokens of this model: {reason}")
        if self.kept(model.num_tokens) < 1:
            raise ValueError(f"training.token_routing.ratio={self.ratio} leaves no token of {model.num_tokens}")

    def kept(self, num_tokens: int) -> int:
        """How many image tokens go through the routed blocks: round((1 - ratio) * T)."""
        return round((1.0 - self.ratio) * num_tokens)

    def draw(self, rng, batch_size: int, num_tokens: int, depth: int) -> Route:
        """An independent uniformly random subset per sample, from rng.rand (the step's randomness, so a
        resumed run draws the same subsets), kept in token order."""
        scores = rng.rand(batch_size * num_tokens).view(batch_size, num_tokens)
        keep = scores.argsort(dim=1)[:, : self.kept(num_tokens)].sort(dim=1).values
        return Route(keep, *self.span(depth))
