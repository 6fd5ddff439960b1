"""How to sample, as settings: the keys sample.py (configs/sample.yaml), the training grids and the in-training
FID (TrainConfig.grid_sampling / fid_sampling) share. A leaf: values are checked here, the sampler's name where
samplers are built (dit/diffusion/registry.py, beside SAMPLERS)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dit.models.config import ADDED_WITH_SCHEMA  # (added after runs were recorded: their digests keep)

__all__ = ["SamplingSettings"]


@dataclass
class SamplingSettings:
    """How to sample: the same keys in sample.py (configs/sample.yaml), the training grids and the
    in-training FID (TrainConfig.grid_sampling / fid_sampling), checked and converted here, once."""

    # a key of SAMPLERS (checked where samplers are built: dit/diffusion/registry.py); null = the objective's sampler
    # for the purpose (registry.sampler_name: default_sampler for sample.py and the grids, eval_sampler for the FID)
    sampler: str | None = None
    steps: int = 250  # model evaluations per image (x2 with guidance)
    cfg_scale: float = 1.0  # the guidance scale w; 1 = unguided
    # cfg: classifier-free (the model's null class); auto: autoguidance by a weaker model of the same task, the guide;
    # input: the scale (and cfg_interval) as the input of a model trained with one (model.guidance_input), 1 call
    guidance: str = field(default="cfg", metadata=ADDED_WITH_SCHEMA)
    # guidance=auto: a checkpoint or export (a smaller zoo size, or the same model trained less), or @STEP for the
    # checkpoint at STEP of the run the sampled checkpoint belongs to (dit.sampling.load_guide)
    guide: str | None = field(default=None, metadata=ADDED_WITH_SCHEMA)
    guidance_channels: int | None = None  # null = every eps channel; 3 = the original DiT code (its FIDs)
    # [lo, hi]: guide only at noise levels in it (Kynkaanniemi et al. 2024); null = at every step
    cfg_interval: tuple[float, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # sampler-specific keyword arguments, e.g. {eta: 1.0}

    def __post_init__(self) -> None:
        if self.sampler is not None and not isinstance(self.sampler, str):
            raise ValueError(f"sampler={self.sampler!r}: a sampler's name (or null)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, Integral) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: need at least 1 sampling step (an integer)")
        self.steps = int(self.steps)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, Real):
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: a number (1 = unguided)")
        self.cfg_scale = float(self.cfg_scale)
        if not isinstance(self.guidance, str):
            raise ValueError(f"guidance={self.guidance!r}: a guidance's name (cfg, auto)")
        if self.guide is not None and (not isinstance(self.guide, str) or not self.guide):
            raise ValueError(f"guide={self.guide!r}: a checkpoint's path, or @STEP")
        if self.cfg_interval is not None:
            self.cfg_interval = _interval(self.cfg_interval)
        self.options = dict(self.options or {})

    @classmethod
    def from_config(cls, node: Any) -> SamplingSettings:
        """The sampling keys of a config node (configs/sample.yaml's top level, training.grid_sampling, a
        dict, a SampleConfig), checked; its other keys are not sampling settings and are ignored."""
        if isinstance(node, DictConfig):
            keys = [f.name for f in fields(cls) if f.name in node]
            node = OmegaConf.to_container(OmegaConf.masked_copy(node, keys), resolve=True)
        elif isinstance(node, SamplingSettings):
            node = {f.name: getattr(node, f.name) for f in fields(node)}
        if not isinstance(node, Mapping):
            raise TypeError(f"sampling settings from a mapping or a config node, not {type(node).__name__}")
        return cls(**{f.name: node[f.name] for f in fields(cls) if f.name in node})


def _interval(value) -> tuple[float, float]:
    """[lo, hi] -> (lo, hi) floats with 0 <= lo <= hi <= 1, or a clear error."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval={value!r}: a pair [lo, hi] of noise levels") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval={[lo, hi]}: need 0 <= lo <= hi <= 1 (noise levels, 1 = pure noise)")
    return lo, hi
