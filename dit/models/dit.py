"""The DiT backbone (Peebles & Xie 2023): patchify, N conditioned transformer blocks, linear decoder.

The conditioning variant is a constructor argument (``block=``, see blocks.py); the backbone itself
never branches on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from dit.models.blocks import BlockOptions, get_block, set_fused_adaln
from dit.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from dit.ops import check_mode

__all__ = ["DiT"]


class DiT(nn.Module):
    """Diffusion model with a transformer backbone. ``model(x, t, y)`` -> (N, out_channels, H, W)."""

    def __init__(
        self,
        input_size: int = 32,  # spatial size of the input (latent 32 for 256x256 images)
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,  # > 0 adds the learned null class used for classifier-free guidance
        num_classes: int = 1000,
        learn_sigma: bool = True,  # output 2C channels: epsilon and the variance interpolation v
        block: str = "adaln_zero",  # conditioning variant, a key of dit.models.BLOCKS
        timestep_freq_shift: int = 0,  # 0: official DiT embedding; 1: diffusers' (see TimestepEmbedder)
        norm_eps: float = 1e-6,  # eps of the blocks' norms (official: 1e-6)
        norm: str = "layernorm",  # layernorm | rmsnorm: every norm in the blocks and the final layer
        qk_norm: bool = False,  # RMSNorm on q and k per head in self-attention (LightningDiT)
        mlp: str = "gelu",  # gelu | swiglu (hidden 2/3 * mlp_ratio * D, rounded to a multiple of 8)
        pos_embed: str = "sincos",  # sincos: fixed absolute embedding added once | rope: 2-D axial RoPE on q/k
        name: str | None = None,  # zoo name, e.g. "DiT-XL/2", kept for exports
        fused_adaln: str = "auto",  # runtime, not architecture: fused norm+modulate kernel auto (CUDA) | true | false
    ):
        super().__init__()
        # The architecture: everything that defines the state dict and the outputs, and nothing else.
        # Saved with exports and checkpoints (config.json "model"), so DiT(**config) rebuilds the model;
        # JSON-serialisable. Runtime choices (fused_adaln) live in self.runtime instead.
        self.config = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            block=block,
            timestep_freq_shift=timestep_freq_shift,
            norm_eps=norm_eps,
            norm=norm,
            qk_norm=qk_norm,
            mlp=mlp,
            pos_embed=pos_embed,
            name=name,
        )
        self.runtime = {"fused_adaln": check_mode(fused_adaln)}
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.block_cls = get_block(block)
        grid_size = input_size // patch_size
        options = BlockOptions(norm=norm, qk_norm=qk_norm, mlp=mlp, pos_embed=pos_embed, grid_size=grid_size)
        self.block = block
        self.name = name
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_tokens = self.x_embedder.num_patches  # T = (input_size / patch_size)^2
        if pos_embed == "sincos":
            # Fixed sin-cos position embedding: a buffer, so optimisers and EMA leave it alone.
            pos = sincos_pos_embed_2d(hidden_size, grid_size).float().unsqueeze(0)
            self.register_buffer("pos_embed", pos, persistent=True)  # (1, T, D)
        else:
            self.pos_embed = None  # RoPE: positions enter through q and k in every self-attention
        # One module for all blocks, when the variant has one (adaLN-single's MLP); identity otherwise.
        self.shared_conditioning = self.block_cls.shared_conditioning(hidden_size)
        self.blocks = nn.ModuleList([self.block_cls(hidden_size, num_heads, mlp_ratio, norm_eps, options) for _ in range(depth)])
        # FSDP wraps (shards) each block as a unit: Accelerate reads this when the config names no class.
        self._no_split_modules = [self.block_cls.__name__]
        self.final_layer = self.block_cls.final_layer(hidden_size, patch_size, self.out_channels, options)
        self.set_fused_adaln(fused_adaln)
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
        # Variant-specific: adaLN-Zero zeroes its modulations and the output layer (identity blocks).
        for module in (*self.blocks, self.final_layer, self.shared_conditioning):
            module.initialize_conditioning()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        h = self.input_size // self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)

    def check_input(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Clear errors for inputs that would otherwise fail as a shape crash deep inside."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        for arg, v in (("t", t), ("y", y)):
            if v.shape != (x.shape[0],):
                raise ValueError(f"{arg} must have shape ({x.shape[0]},) to match x, got {tuple(v.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) images or latents; t: (N,) timesteps; y: (N,) labels (num_classes = null)."""
        self.check_input(x, t, y)
        x = self.x_embedder(x)  # (N, T, D)
        if self.pos_embed is not None:  # backbone option (sincos | rope), not the block variant
            x = x + self.pos_embed
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = self.block_cls.condition(t_emb, y_emb)  # (N, D) for adaLN-like variants, (N, 2, D) otherwise
        c_blocks = self.shared_conditioning(c)  # c itself, or adaLN-single's (N, 6, D)
        x = self.block_cls.add_tokens(x, c)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, c_blocks, use_reentrant=False)
            else:
                x = block(x, c_blocks)  # (N, T, D)
        x = self.block_cls.remove_tokens(x)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)
