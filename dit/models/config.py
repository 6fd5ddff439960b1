"""DiTConfig: the one description of a DiT architecture.

The model is built from it (``DiT(config)``, or ``DiT(**fields)``), every block reads its settings from it,
exports and checkpoints save ``config.architecture()`` as config.json's "model", converters fill it from
other formats, and Hydra checks ``model.*`` against it at composition (``configs/model/dit.yaml``; options
with a fixed set of values are Enums there, so a bad value fails with the valid list).

Two kinds of fields are not architecture, marked once here in the field metadata:
- ``runtime``: how the model computes, not what (the fused kernel); not saved, not in the settings digest.
- ``alias``: ``size`` ("XL/2"), a zoo entry of sizes.py that sets name, depth, hidden_size, num_heads and
  patch_size; saved through those fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dit.models.sizes import zoo_size
from dit.models.spatial import MAP_INPUTS, MAPS
from dit.ops import NORMS, check_mode

__all__ = ["DiTConfig", "Mlp", "Norm", "PosEmbed"]


# the norms the modulate kernels implement (dit.ops): layernorm | rmsnorm
Norm = Enum("Norm", [(n, n) for n in NORMS], type=str)


class Mlp(str, Enum):
    gelu = "gelu"  # DiT: fc1 -> GELU (tanh) -> fc2
    swiglu = "swiglu"  # hidden 2/3 * mlp_ratio * D, rounded to a multiple of 8: the same parameters


class PosEmbed(str, Enum):
    sincos = "sincos"  # fixed absolute embedding, added once (DiT)
    rope = "rope"  # 2-D axial rotary embedding on q/k in every self-attention


CHOICES = {"norm": Norm, "mlp": Mlp, "pos_embed": PosEmbed}
# The marks a schema's field metadata carries (this one, TrainConfig's, OptimConfig's); dit/training/digest.py reads
# them. runtime: how a run computes, not what; alias: saved through other fields.
RUNTIME = {"runtime": True}
ALIAS = {"alias": True}
# Fields added to a schema after runs were recorded: a run whose config predates them has them at their default, and
# the settings digest leaves them out there, so its recorded digest still holds.
ADDED_WITH_SCHEMA = {"added_with_schema": True}


@dataclass
class DiTConfig:
    """A DiT architecture. The four sizes come from ``size`` or are given; the other defaults are the DiT paper's
    (256x256 ImageNet latents, 1,000 classes, adaLN-Zero)."""

    input_size: int = 32  # spatial size of the input (latent 32 for 256x256 images)
    patch_size: int | None = None  # None: from `size`
    in_channels: int = 4
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the learned null class used for classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2C channels: epsilon and the variance interpolation v
    # conditioning variant, a name in dit.models.BLOCKS (an open registry: checked when the model is built)
    block: str = "adaln_zero"
    timestep_freq_shift: int = field(default=0, metadata=ADDED_WITH_SCHEMA)  # 0: DiT's embedding; 1: diffusers'
    norm_eps: float = field(default=1e-6, metadata=ADDED_WITH_SCHEMA)  # eps of the blocks' norms (DiT: 1e-6)
    norm: Norm = "layernorm"  # every norm in the blocks and the final layer (adain, cbn, adagn, film: their own)
    norm_groups: int = field(default=32, metadata=ADDED_WITH_SCHEMA)  # block adagn: channel groups per token
    # A spatial condition (dit/models/spatial.py): a map kind of MAPS (silhouette) given with each image at
    # map_size x map_size, entering as map_input (MAP_INPUTS: channels | tokens | blocks, for blocks that read it:
    # spade); none = class-conditional only
    cond_map: str | None = field(default=None, metadata=ADDED_WITH_SCHEMA)
    map_size: int = field(default=8, metadata=ADDED_WITH_SCHEMA)
    map_input: str = field(default="none", metadata=ADDED_WITH_SCHEMA)
    # A second time input h through its own TimestepEmbedder, added to the timestep's embedding (so every block reads
    # it through the same conditioning path): the interval to the output time of few-step models (MeanFlow's t - r,
    # a shortcut model's step size; dit/diffusion/few_step.py). Its output layer starts at zero: a fresh interval
    # input leaves the model what it was at every h (init_from a flow model starts as that model).
    interval_input: bool = field(default=False, metadata=ADDED_WITH_SCHEMA)
    # The guidance asked for as an input (improved MeanFlow's guidance conditions): (scale, lo, hi) through their own
    # embedding (GuidanceEmbedder), added to the timestep's as the interval is; its output layer starts at zero too.
    # Such a model is guided in one call an image (sample.py guidance=input cfg_scale=3), at a scale chosen after
    # training (diffusion=meanflow with diffusion.guidance_input=true trains it).
    guidance_input: bool = field(default=False, metadata=ADDED_WITH_SCHEMA)
    qk_norm: bool = False  # RMSNorm on q and k per head in self-attention (LightningDiT)
    mlp: Mlp = "gelu"
    pos_embed: PosEmbed = "sincos"
    name: str | None = None  # zoo name, e.g. "DiT-XL/2" (None: a custom size)
    size: str | None = field(default=None, metadata=ALIAS)  # "XL/2": sets the four sizes and the name
    # auto (CUDA) | true | false, or a bool: fused norm+modulate kernel. Any: YAML reads true/false as bools.
    fused_adaln: Any = field(default="auto", metadata=RUNTIME)

    def __post_init__(self) -> None:
        for key, kind in CHOICES.items():  # plain strings inside, whatever came in (str, Enum member)
            value = getattr(self, key)
            value = value.value if isinstance(value, Enum) else value
            if value not in kind.__members__:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(kind.__members__)}")
            setattr(self, key, value)
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; valid: true, false")
        self._check_map()
        self.fused_adaln = check_mode(self.fused_adaln)
        self._apply_size()
        missing = [k for k in ("patch_size", "hidden_size", "depth", "num_heads") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"model {', '.join(missing)} not set: give them, or a zoo size (model.size=XL/2)")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    def _check_map(self) -> None:
        """The spatial-condition fields agree with each other (one line naming the key). Whether they agree with
        the block is the block registry's check (dit.models.blocks.check_config, run when the model is built)."""
        MAP_INPUTS[self.map_input]  # unknown map input 'x'; valid map inputs: ...
        if self.cond_map is None:
            if self.map_input != "none":
                raise ValueError(
                    f"model.map_input={self.map_input} needs a spatial condition: set model.cond_map (a map kind: "
                    f"{', '.join(MAPS)})"
                )
            return
        MAPS[self.cond_map]  # unknown map kind
        if isinstance(self.map_size, bool) or not isinstance(self.map_size, int) or self.map_size < 1:
            raise ValueError(f"model.map_size={self.map_size!r}: the map's side in cells, a positive integer")
        if self.map_input == "none":
            raise ValueError(
                f"model.cond_map={self.cond_map} needs model.map_input: how the map enters "
                f"({', '.join(n for n in MAP_INPUTS if n != 'none')})"
            )

    def _apply_size(self) -> None:
        """Fill the sizes from `size`; a given value that disagrees with it is an error (not a silent mix)."""
        if self.size is None:
            return
        for key, value in zoo_size(self.size).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
            elif getattr(self, key) != value:
                raise ValueError(
                    f"model.{key}={getattr(self, key)} but size {self.size} has {value}: "
                    "set model.size=null (and every size field) for a custom architecture"
                )
        self.name = self.name or f"DiT-{self.size}"
        self.size = None  # recorded through the name and the four sizes

    @property
    def grid_size(self) -> int:
        """Tokens per side of the image grid."""
        return self.input_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def architecture(self) -> dict:
        """What defines the state dict and the outputs, and nothing else: config.json's "model", JSON-ready."""
        meta = {f.name: f.metadata for f in dataclasses.fields(self)}
        return {
            k: v for k, v in dataclasses.asdict(self).items() if not (meta[k].get("runtime") or meta[k].get("alias"))
        }

    @classmethod
    def from_dict(cls, config: dict, source: object = "the model config") -> DiTConfig:
        """From a saved architecture (older files may lack keys added since: they mean their default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"{source}: unknown model keys {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**config)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}
