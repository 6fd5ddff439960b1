"""The DiT backbone (Peebles & Xie 2023): patchify, N conditioned transformer blocks, linear decoder.

Built from a DiTConfig (config.py); the conditioning variant is its ``block`` (see blocks/), and the
backbone itself never branches on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from dit.models.blocks import check_config, get_block, set_fused_adaln
from dit.models.config import DiTConfig
from dit.models.embeddings import GuidanceEmbedder, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from dit.models.routing import Route
from dit.models.spatial import MAP_INPUTS, MAPS, drop_maps

__all__ = ["DiT"]


class DiT(nn.Module):
    """Diffusion model with a transformer backbone. ``model(x, t, y)`` -> (N, out_channels, H, W)."""

    def __init__(self, config: DiTConfig | None = None, **fields):
        """``DiT(config)`` or ``DiT(**fields)`` (the fields of DiTConfig, e.g. ``DiT(size="XL/2", input_size=32)``)."""
        super().__init__()
        if config is None:
            config = DiTConfig(**fields)
        elif fields:
            raise TypeError("DiT(config) takes no other settings; put them in the config")
        check_config(config)  # what the config alone cannot check: its block is registered and fits its map
        # The architecture: saved with exports and checkpoints (config.json "model"), DiT(**config.architecture())
        # rebuilds the model. Runtime choices (fused_adaln) are in self.runtime, not in it.
        self.config = config
        self.runtime = {"fused_adaln": config.fused_adaln}
        self.block_cls = get_block(config.block)
        self.block = config.block
        self.name = config.name
        self.input_size = config.input_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.learn_sigma = config.learn_sigma
        self.patch_size = config.patch_size
        self.num_classes = config.num_classes
        self.gradient_checkpointing = False

        hidden_size = config.hidden_size
        # A spatial condition (spatial.py): how maps are made from images, and how they enter (none: no map).
        self.map_kind = MAPS[config.cond_map]() if config.cond_map else None
        self.map_size = config.map_size
        self.map_input = MAP_INPUTS[config.map_input](config)
        embed_channels = config.in_channels + self.map_input.extra_channels
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, embed_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden_size, config.class_dropout_prob)
        # few-step models' second time (config.interval_input); None for the others
        self.h_embedder = TimestepEmbedder(hidden_size) if config.interval_input else None
        # the guidance asked for, (scale, lo, hi) (config.guidance_input); None for the others
        self.g_embedder = GuidanceEmbedder(hidden_size) if config.guidance_input else None
        self.num_tokens = self.x_embedder.num_patches  # T = (input_size / patch_size)^2
        if config.pos_embed == "sincos":
            # Fixed sin-cos position embedding: a buffer, so optimisers and EMA leave it alone.
            pos = sincos_pos_embed_2d(hidden_size, config.grid_size).float().unsqueeze(0)
            self.register_buffer("pos_embed", pos, persistent=True)  # (1, T, D)
        else:
            self.pos_embed = None  # RoPE: positions enter through q and k in every self-attention
        # One module for all blocks, when the variant has one (adaLN-single's MLP); identity otherwise.
        self.shared_conditioning = self.block_cls.shared_conditioning(config)
        self.blocks = nn.ModuleList([self.block_cls(config) for _ in range(config.depth)])
        # FSDP wraps (shards) each block as a unit: Accelerate reads this when the config names no class.
        self._no_split_modules = [self.block_cls.__name__]
        self.final_layer = self.block_cls.final_layer(config)
        self.set_fused_adaln(config.fused_adaln)
        self.initialize_weights()

    def set_fused_adaln(self, mode: str | bool) -> None:
        """Route every adaptive LayerNorm/RMSNorm through the fused kernel: "auto" | "true" | "false".
        Resolved here, once, to the function each norm calls (not parsed per forward)."""
        self.runtime["fused_adaln"] = set_fused_adaln(self, mode)

    def initialize_weights(self) -> None:
        """All initialisation in one place (the official DiT scheme, plus each variant's own)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding initialised like nn.Linear, not nn.Conv2d.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.h_embedder is not None:  # as t's, but its output zero: the model starts as it is without it
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.h_embedder.mlp[2].weight)
        if self.g_embedder is not None:  # likewise: a fresh guidance input leaves the model unguided at first
            nn.init.normal_(self.g_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.g_embedder.mlp[2].weight)
        # Variant-specific: adaLN-Zero zeroes its modulations and the output layer (identity blocks).
        for module in (*self.blocks, self.final_layer, self.shared_conditioning, self.map_input):
            module.initialize_conditioning()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        h = self.input_size // self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)

    def check_input(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cond_map: torch.Tensor | None,
        h: torch.Tensor | None,
        g: torch.Tensor | None = None,
    ) -> None:
        """Clear errors for inputs that would otherwise fail as a shape crash deep inside."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if h is not None and self.h_embedder is None:
            raise ValueError("h (an interval) given, but this model has no interval input (model.interval_input=false)")
        for arg, v in (("t", t), ("y", y), ("h", t if h is None else h)):
            if v.shape != (x.shape[0],):
                raise ValueError(f"{arg} must have shape ({x.shape[0]},) to match x, got {tuple(v.shape)}")
        if g is not None and self.g_embedder is None:
            raise ValueError("g (a guidance) given, but this model has no guidance input (model.guidance_input=false)")
        if g is not None and g.shape != (x.shape[0], 3):
            raise ValueError(f"g must have shape ({x.shape[0]}, 3) to match x: (scale, lo, hi), got {tuple(g.shape)}")
        if self.map_kind is None:
            if cond_map is not None:
                raise ValueError("cond_map given, but this model takes no spatial condition (model.cond_map=null)")
            return
        expected = (x.shape[0], self.map_kind.channels, self.map_size, self.map_size)
        if cond_map is None or tuple(cond_map.shape) != expected:
            got = "none" if cond_map is None else tuple(cond_map.shape)
            raise ValueError(
                f"this model reads a {self.map_kind.name} map with each image: cond_map of shape {expected}, got {got} "
                "(zeros = no map)"
            )

    def example_conditions(self, n: int) -> dict:
        """forward's keyword conditions beyond y for n images, empty (on the current default device): the null map
        of a model with a spatial condition, nothing otherwise. For counting FLOPs and shape checks."""
        if self.map_kind is None:
            return {}
        return {"cond_map": torch.zeros(n, self.map_kind.channels, self.map_size, self.map_size)}

    def routing_refusal(self) -> str | None:
        """Why TREAD token routing (routing.py) cannot skip tokens past blocks of this model, or None."""
        if self.config.pos_embed == "rope":
            return "pos_embed=rope rotates each token by its place on the full grid"
        return self.block_cls.routing_refusal

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        route: Route | None = None,
        cond_map: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) images or latents; t: (N,) timesteps; y: (N,) labels (num_classes = null).
        h: (N,) intervals of a model with an interval input (model.interval_input; None = 0: the instantaneous
        velocity, what a flow model predicts). g: (N, 3) guidance (scale, lo, hi) of a model with a guidance input
        (model.guidance_input; None = (1, 0, 1): unguided).
        route: TREAD token routing for this training step (routing.py); None = every token through every block.
        cond_map: (N, C_m, s, s) spatial condition of a model with model.cond_map (zeros = none); label dropout
        drops a label's map with it."""
        self.check_input(x, t, y, cond_map, h, g)
        if route is not None and not 0 <= route.start < route.end <= len(self.blocks):
            raise ValueError(f"route spans blocks [{route.start}, {route.end}) of a model of depth {len(self.blocks)}")
        if cond_map is not None and self.y_embedder.has_null_class:
            if force_drop_ids is None and self.training:  # the embedder's rule, drawn here to drop maps alike
                force_drop_ids = self.y_embedder.drops(torch.rand(len(y), device=y.device))
            if force_drop_ids is not None:
                cond_map = drop_maps(cond_map, force_drop_ids)
        x = self.x_embedder(self.map_input.embed_input(x, cond_map))  # (N, T, D)
        if self.pos_embed is not None:  # backbone option (sincos | rope), not the block variant
            x = x + self.pos_embed
        t_emb = self.t_embedder(t)  # (N, D)
        if self.h_embedder is not None:
            t_emb = t_emb + self.h_embedder(torch.zeros_like(t) if h is None else h)
        if self.g_embedder is not None:
            if g is None:
                g = torch.tensor(GuidanceEmbedder.UNGUIDED, device=t.device, dtype=t.dtype).expand(len(t), 3)
            t_emb = t_emb + self.g_embedder(g)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = self.block_cls.condition(t_emb, y_emb)  # (N, D) for adaLN-like variants, (N, 2, D) otherwise
        c_blocks = self.shared_conditioning(c)  # c itself, or adaLN-single's (N, 6, D)
        x = self.block_cls.add_tokens(x, c)
        x, c_blocks = self.map_input.add(x, c_blocks, cond_map)  # map tokens in front, or (c_blocks, map)
        extra = self.block_cls.num_extra_tokens + self.map_input.num_tokens
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start:
                x, held = route.split(x, extra)  # (N, E + K, D): the routed tokens wait in `held`
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, c_blocks, use_reentrant=False)
            else:
                x = block(x, c_blocks)  # (N, E + T, D)
            if route is not None and i == route.end - 1:
                x = route.merge(x, held, extra)
        x = self.map_input.remove_tokens(x)
        x = self.block_cls.remove_tokens(x)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)
