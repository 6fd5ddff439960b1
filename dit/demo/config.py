"""python -m dit.demo's settings: the command line (key=value, as sample.py's) -> DemoConfig, and the host check."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

__all__ = ["DemoConfig", "host_warning", "parse_args"]


@dataclass
class DemoConfig:
    """python -m dit.demo's settings (key=value on the command line, as sample.py's). The bounds hold for one
    request, so that one page (or one API call) cannot keep the machine busy for minutes."""

    checkpoint: Any = MISSING  # one path, or a list [A,B,...]: what sample.py takes (export, step_*, .pt, diffusers)
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 = every interface (a warning says so)
    port: int = 7860
    use_ema: bool = True  # our checkpoints: EMA weights (false: raw weights)
    vae: str | None = None  # latent models: diffusers AutoencoderKL hub id or local path (default: from checkpoint)
    device: str = "auto"  # auto = cuda when there is one, else cpu
    # autoguidance's weaker model (Karras et al. 2024): a checkpoint or export, or @STEP = the checkpoint at STEP of
    # each checkpoint's own run (dit.sampling.load_guide, checked against each at start); the page then offers
    # "autoguidance" beside classifier-free guidance. null: classifier-free only, as sample.py's guidance=cfg
    guide: str | None = None
    batch_size: int = 64  # as sample.py's default, so the same seed gives sample.py's images
    max_images: int = 16  # per checkpoint and request (classes x per_class)
    max_steps: int = 100  # sampling steps per request
    cfg_range: list[float] = field(default_factory=lambda: [1.0, 10.0])  # [lo, hi] of cfg_scale
    queue_size: int = 16  # requests that may wait for the model; the next is told "Queue is full" (memory stays put)
    # what the page shows first
    steps: int = 25
    cfg_scale: float = 4.0
    per_class: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, (str, Path)):
            self.checkpoint = [self.checkpoint]
        if self.checkpoint is MISSING or not self.checkpoint:
            raise ValueError("checkpoint=<path> (or checkpoint=[A,B] for two side by side) is required")
        self.checkpoint = [str(c) for c in self.checkpoint]
        if self.guide is not None:
            self.guide = str(self.guide)
            if not self.guide:
                raise ValueError("guide=: a checkpoint's path, or @STEP for the checkpoint at STEP of its run")
        lo, hi = (float(v) for v in self.cfg_range)
        if not 0 <= lo <= hi:
            raise ValueError(f"cfg_range={[lo, hi]}: need 0 <= lo <= hi")
        self.cfg_range = [lo, hi]
        for key in ("max_images", "max_steps", "queue_size", "batch_size", "per_class", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: need at least 1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: need 1..65535")
        # the page's first values lie within the bounds
        self.steps = min(self.steps, self.max_steps)
        self.per_class = min(self.per_class, self.max_images)
        self.cfg_scale = min(max(self.cfg_scale, lo), hi)


def parse_args(argv: Sequence[str]) -> DemoConfig:
    """key=value arguments (checkpoint=A or checkpoint=[A,B], host=, port=, max_steps=, guide=, ...) -> DemoConfig."""
    argv = list(argv)
    # guide= is taken as typed: YAML (OmegaConf.from_cli) refuses a leading @ and would read guide=500 as a number
    guides = [a.split("=", 1)[1] for a in argv if a.startswith("guide=")]
    cli = OmegaConf.from_cli([a for a in argv if not a.startswith("guide=")])
    schema = OmegaConf.structured(DemoConfig(checkpoint=["-"]))
    unknown = sorted(set(cli) - set(schema))
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)}; valid keys: {', '.join(schema)}")
    if "checkpoint" not in cli:
        raise ValueError("checkpoint=<path> (or checkpoint=[A,B] for two side by side) is required")
    merged = OmegaConf.merge(schema, cli)
    values = OmegaConf.to_container(merged, resolve=True)
    if guides:
        values["guide"] = None if guides[-1] == "null" else guides[-1]
    return DemoConfig(**values)


def host_warning(host: str) -> str | None:
    """A warning for a host other than loopback: the page is then open to whoever can reach this machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (
        f"warning: host={host}: the demo listens beyond this machine; anyone who can reach this port can "
        "sample from the loaded checkpoints (no authentication). host=127.0.0.1 (the default) keeps it local."
    )
