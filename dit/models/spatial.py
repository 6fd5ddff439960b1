"""Spatial conditions: a low-resolution map given with each image (SPADE's input, Park et al. 2019), and the ways it
enters a DiT.

A map kind (``MAPS``, ``model.cond_map``) says how a map is made from an image, so that training (from the clean
batch), sampling (from files or the test split, sample.py) and evaluation (the sample's own map against the one
it was given: IoU) compute it the same way. Maps are (N, channels, map_size, map_size) in {-1, +1}; 0 everywhere is
the null map, "no map": what label dropout puts in its place in training (the same draws as the labels') and
classifier-free guidance's unconditional branch reads.

How the map enters (``MAP_INPUTS``, ``model.map_input``), one class each, hooks the backbone calls unconditionally:

    x = map_input.embed_input(x, m)            # channels: the map, resized, as extra input channels
    ...  x = Block.add_tokens(x, c)
    x, c_blocks = map_input.add(x, c_blocks, m)  # tokens: map tokens in front; blocks: c_blocks = (c_blocks, m)
    ...  blocks ...
    x = map_input.remove_tokens(x)

``none`` is the identity (class-conditional models: their state dict and outputs are unchanged). ``blocks`` hands
the map to blocks that read it (``Block.reads_map``: SPADE).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit.models.embeddings import PatchEmbed, sincos_pos_embed_2d
from dit.registry import Registry

__all__ = ["MAPS", "MAP_INPUTS", "MapKind", "Silhouette", "drop_maps", "map_images", "map_iou", "null_map"]


def null_map(m: torch.Tensor) -> torch.Tensor:
    """The map that means "no map" (dropped labels' companion; guidance's unconditional branch)."""
    return torch.zeros_like(m)


def drop_maps(m: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Null maps where drops == 1 (the label dropout draws, so a label and its map are dropped together)."""
    return torch.where(drops.view(-1, *([1] * (m.dim() - 1))).bool(), null_map(m), m)


class MapKind:
    """How a map is made from images in [-1, 1] (N, C, H, W): ``kind(images, size) -> (N, channels, size, size)``
    in {-1, +1}. Adding a kind = one class and its line in MAPS."""

    name: ClassVar[str]
    channels: ClassVar[int]

    def __call__(self, images: torch.Tensor, size: int) -> torch.Tensor:
        raise NotImplementedError


class Silhouette(MapKind):
    """The garment's silhouette: pixels brighter than the background (intensity > ``threshold`` of the [0, 1] range)
    are the garment; the binary image is averaged over (H/size)^2 cells and a cell is garment (+1) when at least
    half of it is, background (-1) otherwise. One channel."""

    name = "silhouette"
    channels = 1
    threshold = 0.1  # in [0, 1] intensity: Fashion-MNIST's background is 0, its darkest garments' pixels ~0.1-0.2

    def __call__(self, images: torch.Tensor, size: int) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"silhouettes of (N, C, H, W) images, got shape {tuple(images.shape)}")
        garment = (images.float().mean(1, keepdim=True) > 2 * self.threshold - 1).float()
        if garment.shape[-1] % size or garment.shape[-2] % size:
            garment = F.interpolate(garment, size=(size * math.ceil(garment.shape[-2] / size),) * 2, mode="nearest")
        cells = F.adaptive_avg_pool2d(garment, size)
        return torch.where(cells >= 0.5, 1.0, -1.0).to(images.dtype if images.is_floating_point() else torch.float32)


def map_images(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (N, C, s, s) in [-1, 1] as uint8 (N, size, size, C) images (nearest upsampling): +1 white, -1 black."""
    up = F.interpolate(maps.float(), size=(size, size), mode="nearest")
    return torch.clamp(127.5 * up + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# The kinds of spatial condition, model.cond_map=<name>: one line per class.
MAPS: Registry[MapKind] = Registry("map kind", [Silhouette])


def map_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample intersection over union of the +1 cells of two maps (N, C, s, s); 1 where both are empty."""
    a, b = a > 0, b > 0
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


#################################################################################
#                    How the map enters the model                               #
#################################################################################


class MapInput(nn.Module):
    """A way for the map to enter (see the module docstring). The base class is the identity."""

    name: ClassVar[str]
    extra_channels: ClassVar[int] = 0  # added to the patch embedding's input channels
    num_tokens: int = 0  # tokens in front of the sequence through every block

    def __init__(self, config):
        super().__init__()

    def embed_input(self, x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return x

    def add(self, x: torch.Tensor, c_blocks, m: torch.Tensor | None):
        return x, c_blocks

    def remove_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def initialize_conditioning(self) -> None:
        pass


class NoMap(MapInput):
    """No spatial condition: a class-conditional DiT, unchanged."""

    name = "none"


class ChannelsMap(MapInput):
    """The map resized (nearest) to the image and concatenated to it as extra input channels: the patch embedding
    sees it (the usual way for dense conditions: SR3, ControlNet's simplest baseline)."""

    name = "channels"

    def __init__(self, config):
        super().__init__(config)
        self.extra_channels = MAPS[config.cond_map].channels

    def embed_input(self, x, m):
        return torch.cat([x, F.interpolate(m.to(x.dtype), size=x.shape[-2:], mode="nearest")], dim=1)


class TokensMap(MapInput):
    """The map as in-context tokens: patches of the map (one token per image token's place: patch map_size / grid)
    embedded by their own linear layer, with the image tokens' sin-cos positions plus a learned map-type embedding,
    in front of the sequence through every block, removed before the final layer."""

    name = "tokens"

    def __init__(self, config):
        super().__init__(config)
        grid, size = config.grid_size, config.map_size
        if size % grid:
            raise ValueError(
                f"model.map_input=tokens: model.map_size={size} must be a multiple of the token grid {grid}"
            )
        d = config.hidden_size
        self.embed = PatchEmbed(size, size // grid, MAPS[config.cond_map].channels, d, bias=True)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid).float().unsqueeze(0), persistent=True)
        self.type_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.num_tokens = grid * grid

    def add(self, x, c_blocks, m):
        tokens = self.embed(m.to(x.dtype)) + self.pos_embed + self.type_embed
        return torch.cat([tokens.to(x.dtype), x], dim=1), c_blocks

    def remove_tokens(self, x):
        return x[:, self.num_tokens :]

    def initialize_conditioning(self) -> None:
        w = self.embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.embed.proj.bias)
        nn.init.normal_(self.type_embed, std=0.02)


class BlocksMap(MapInput):
    """The map handed to every block beside c (``c_blocks = (c_blocks, map)``), for blocks that read it (SPADE)."""

    name = "blocks"

    def add(self, x, c_blocks, m):
        return x, (c_blocks, m)


# How a spatial condition enters, model.map_input=<name>: one line per class.
MAP_INPUTS: Registry[MapInput] = Registry("map input", [NoMap, ChannelsMap, TokensMap, BlocksMap])
