"""What a DiT architecture costs: parameters and FLOPs, counted by torch.utils.flop_counter on the meta device (no
weights are allocated, so even DiT-XL/2 is counted in about a second).

    count_config(config)              # params, forward GFLOPs of one image (multiply-adds, as the DiT paper), tokens
    training_flops(config, routing)   # FLOPs of one training image, forward and backward (2 per multiply-add)

Both count one image with TREAD token routing when it is given (routing.py). ``python -m dit.zoo`` prints the
zoo's counts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from dit.models.config import DiTConfig
from dit.models.dit import DiT
from dit.models.routing import Route, TokenRouting

__all__ = ["count_config", "meta_model", "training_flops"]


def counted_once(count):
    """count(config, routing), kept by the values of its arguments (a count depends on nothing else): a process that
    trains or reports many runs of one architecture counts it once."""
    done = {}

    @functools.wraps(count)
    def cached(config: DiTConfig, routing: TokenRouting | None = None):
        key = json.dumps([dataclasses.asdict(config), routing and dataclasses.asdict(routing)], default=str)
        if key not in done:
            done[key] = count(config, routing)
        return copy.copy(done[key])

    return cached


def meta_model(config: DiTConfig, routing: TokenRouting | None = None) -> tuple[DiT, dict]:
    """The model on the meta device, in eval mode (no label dropout draws: the count does not depend on them), and
    forward's keyword arguments for one image: x, t, y, its conditions (a spatial map), and the TREAD route when
    ``routing`` is on. On meta tensors every fused_adaln mode runs the reference, so it is built with "false"."""
    with torch.device("meta"):
        model = DiT(dataclasses.replace(config, fused_adaln="false"))
        inputs = dict(
            x=torch.empty(1, config.in_channels, config.input_size, config.input_size),
            t=torch.zeros(1, dtype=torch.long),
            y=torch.zeros(1, dtype=torch.long),
            **model.example_conditions(1),
        )
        if routing is not None and routing.enabled:
            routing.check(model)
            keep = torch.arange(routing.kept(model.num_tokens)).unsqueeze(0)  # which ones does not change the count
            inputs["route"] = Route(keep, *routing.span(len(model.blocks)))
    return model.eval(), inputs


@counted_once
def count_config(config: DiTConfig, routing: TokenRouting | None = None) -> dict:
    """Trainable parameters, forward GFLOPs (multiply-adds: FLOPs / 2) and tokens of any architecture (a zoo
    entry, a run's recorded model config, e.g. with a spatial map); with ``routing`` (TREAD), the GFLOPs of a
    training forward with that share of the tokens routed past its blocks."""
    model, inputs = meta_model(config, routing)
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return dict(
        model=config.name,
        block=config.block,
        params=sum(p.numel() for p in model.parameters()),
        gflops=counter.get_total_flops() / 2 / 1e9,
        tokens=model.num_tokens,
    )


@counted_once
def training_flops(config: DiTConfig, routing: TokenRouting | None = None) -> float:
    """FLOPs of one training image through the DiT, forward and backward (torch.utils.flop_counter's count, i.e.
    2 per multiply-add), with TREAD token routing when given. The loss, the optimiser and the EMA are left out:
    they do not grow with the tokens."""
    model, inputs = meta_model(config, routing)
    with FlopCounterMode(display=False) as counter:
        model(**inputs).sum().backward()
    return float(counter.get_total_flops())
