"""DiT models: ``create_model("DiT-XL/2", block="adaln_zero", ...)``, or ``DiT(DiTConfig(...))``.

    config.py      DiTConfig: the one description of an architecture
    sizes.py       the zoo's sizes, as data
    dit.py         the backbone
    blocks/        the conditioning blocks and their registry
    embeddings.py  patches, timesteps, labels, sin-cos positions
    spatial.py     spatial condition maps and the ways they enter
    routing.py     TREAD token routing
    flops.py       parameters and FLOPs, counted on the meta device
    state_dict.py  strict state-dict loading

Imports point down: config.py knows no block; the block registry checks a config (blocks.check_config, run by DiT).
"""

from __future__ import annotations

from dit.models.blocks import BLOCKS, MLPS, NORMS, POS_EMBEDS, check_config, get_block, set_fused_adaln
from dit.models.config import DiTConfig
from dit.models.dit import DiT
from dit.models.sizes import DIT_MODELS, PATCH_SIZES, SIZES, config_name, model_config

__all__ = [
    "BLOCKS",
    "DIT_MODELS",
    "MLPS",
    "NORMS",
    "PATCH_SIZES",
    "POS_EMBEDS",
    "SIZES",
    "DiT",
    "DiTConfig",
    "check_config",
    "config_name",
    "create_model",
    "get_block",
    "model_config",
    "set_fused_adaln",
]


def create_model(name: str, block: str = "adaln_zero", **kwargs) -> DiT:
    """Build a zoo model by name, e.g. create_model("DiT-XL/2", input_size=32, in_channels=4)."""
    return DiT(DiTConfig(**model_config(name), block=block, name=name, **kwargs))
