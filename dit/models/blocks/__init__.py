"""Conditioning blocks, one class each, one registry: the four variants of the DiT paper (section 3.2,
Figure 3), three from later work (DiffiT's TMSA, PixArt-alpha's adaLN-single, AdaIN), the normalisation
arms around adaLN-Zero's modulation (NormalisedBlock: AdaIN, conditional BatchNorm, AdaGN, FiLM), and SPADE for a
spatial condition map (dit/models/spatial.py).

Every block has the same signature, ``forward(x, c) -> x`` with x: (N, T, D). What ``c`` is, whether
extra tokens ride along in x, which final layer decodes the tokens, and whether one module shared by
all blocks turns c into what the blocks read, are decided by small static hooks on the class, so the
backbone is one loop with no branching on the variant:

    c = Block.condition(t_emb, y_emb)
    c_blocks = shared(c)                      # shared = Block.shared_conditioning(D); identity by default
    x = Block.add_tokens(x, c)
    for block in blocks: x = block(x, c_blocks)
    x = Block.remove_tokens(x)
    x = final_layer(x, c)                     # final_layer = Block.final_layer(config)

Every block is built from the model's ``DiTConfig``, which also carries the backbone options orthogonal to the
variant (the norm, q/k RMSNorm, the MLP, RoPE). The package, by family:

    layers.py      the sub-layers: norms and modulated norms, MLPs, RoPE, attention
    base.py        Block and its hooks, the builders of a block's sub-layers, the final layers
    paper.py       the DiT paper's four: in_context, cross_attn, adaln, adaln_zero
    later.py       later work: diffit, adaln_single
    normalised.py  the normalisation arms: adain, cbn, adagn, film
    spade.py       spade, which reads a spatial condition map

Adding a variant = one class in the module of its family and its line in ``BLOCKS`` below (docs/extending.md).
"""

from __future__ import annotations

import torch.nn as nn

from dit.models.blocks.base import (
    AdaLNFinalLayer,
    Block,
    FinalLayer,
    NoSharedConditioning,
    block_mlp,
    block_norm,
    block_rope,
    decoder,
    self_attention,
)
from dit.models.blocks.later import (
    AdaLNSingleBlock,
    AdaLNSingleFinalLayer,
    DiffiTBlock,
    DiffiTFinalLayer,
    SharedModulation,
    TimeDependentAttention,
)
from dit.models.blocks.layers import (
    MLPS,
    POS_EMBEDS,
    Attention,
    CrossAttention,
    ModulatedNorm,
    RoPE2d,
    make_mlp,
    make_norm,
    swiglu_hidden_size,
)
from dit.models.blocks.normalised import (
    AdaGNBlock,
    AdaINBlock,
    BatchNormModulate,
    CBNBlock,
    FiLMBlock,
    FiLMModulate,
    GroupNormModulate,
    InstanceNormModulate,
    NormalisedBlock,
)
from dit.models.blocks.paper import AdaLNBlock, AdaLNZeroBlock, CrossAttentionBlock, DiTBlock, InContextBlock
from dit.models.blocks.spade import SPADEBlock, SpatialModulation
from dit.models.config import DiTConfig
from dit.models.spatial import MAPS
from dit.ops import NORMS, check_mode
from dit.registry import Registry

__all__ = [
    "BLOCKS",
    "MLPS",
    "NORMS",
    "POS_EMBEDS",
    "AdaGNBlock",
    "AdaINBlock",
    "AdaLNBlock",
    "AdaLNFinalLayer",
    "AdaLNSingleBlock",
    "AdaLNSingleFinalLayer",
    "AdaLNZeroBlock",
    "Attention",
    "BatchNormModulate",
    "Block",
    "CBNBlock",
    "CrossAttention",
    "CrossAttentionBlock",
    "DiTBlock",
    "DiffiTBlock",
    "DiffiTFinalLayer",
    "FiLMBlock",
    "FiLMModulate",
    "FinalLayer",
    "GroupNormModulate",
    "InContextBlock",
    "InstanceNormModulate",
    "ModulatedNorm",
    "NoSharedConditioning",
    "NormalisedBlock",
    "RoPE2d",
    "SPADEBlock",
    "SharedModulation",
    "SpatialModulation",
    "TimeDependentAttention",
    "block_mlp",
    "block_norm",
    "block_rope",
    "check_config",
    "decoder",
    "get_block",
    "make_mlp",
    "make_norm",
    "self_attention",
    "set_fused_adaln",
    "swiglu_hidden_size",
]

# The conditioning variants, selectable as model.block=<name>: one line per class.
BLOCKS: Registry[Block] = Registry(
    "block",
    [
        InContextBlock,
        CrossAttentionBlock,
        AdaLNBlock,
        AdaLNZeroBlock,
        DiffiTBlock,
        AdaLNSingleBlock,
        AdaINBlock,
        CBNBlock,
        AdaGNBlock,
        FiLMBlock,
        SPADEBlock,
    ],
)


def get_block(name: str) -> type[Block]:
    """The block class registered as ``name``; a clear error listing the valid names otherwise."""
    return BLOCKS[name]


def check_config(config: DiTConfig) -> None:
    """The checks of a model config that need its block class (DiTConfig checks the rest when it is made; DiT
    runs these when it is built): the block is registered, and it reads a spatial map exactly when the config
    gives one and hands it to the blocks (model.map_input=blocks). One line naming the key."""
    reads_map = get_block(config.block).reads_map  # an unknown block: one line naming the valid ones
    if config.cond_map is None:
        if reads_map:
            raise ValueError(
                f"model.block={config.block} needs a spatial condition: set model.cond_map (a map kind: "
                f"{', '.join(MAPS)})"
            )
        return
    if (config.map_input == "blocks") != reads_map:
        raise ValueError(
            f"model.block={config.block} reads the map in every block: set model.map_input=blocks"
            if reads_map
            else f"model.map_input=blocks: block {config.block} does not read a map (block=spade does); "
            "use map_input=channels or tokens"
        )


def set_fused_adaln(module: nn.Module, mode: str | bool) -> str:
    """Route every modulated LayerNorm/RMSNorm under ``module`` through the fused kernel or not:
    "auto" | "true" | "false". Returns the normalised mode. The state dict does not change."""
    mode = check_mode(mode)
    for m in module.modules():
        if isinstance(m, ModulatedNorm):
            m.set_fused(mode)
    return mode
