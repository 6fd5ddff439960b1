"""The page's logic without the page: checkpoints (and their guides) by label, requests checked against the bounds,
grids sampled as sample.py samples them (dit.sampling.generate)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit.demo.config import DemoConfig
from dit.diffusion import SAMPLERS, SamplingSettings, build_sampler
from dit.hub import load_model, objective_of
from dit.sampling import (
    GenerationSpec,
    generate,
    grid_array,
    guide_path,
    load_guide,
    load_vae,
    make_labels,
    resolve_classes,
)

__all__ = [
    "CLASSIFIER_FREE",
    "MAX_SEED",
    "NONE",
    "Checkpoint",
    "Demo",
    "Request",
    "RequestError",
    "checkpoint_label",
    "evaluations",
]

NONE = "(none)"  # the second panel's choice for "only one grid"
MAX_SEED = 2**32 - 1
INPUT_GUIDANCE = "the model's own (one call a step)"  # models with a guidance input (model.guidance_input)
CLASSIFIER_FREE = "classifier-free"  # the guidance choice of every page; "autoguidance (guide: ...)" with guide=


def checkpoint_label(path: str | Path) -> str:
    """What the page calls a checkpoint: its run directory and step, never the path itself.
    <run>/checkpoints/step_0001000 -> "<run> step 1000", <run>/model -> "<run> export", else the file's name."""
    p = Path(path).resolve() if Path(path).exists() else Path(path)
    if p.name.startswith("step_") and p.parent.name == "checkpoints" and p.name[5:].isdigit():
        return f"{p.parent.parent.name} step {int(p.name[5:])}"
    if p.name == "model" and p.is_dir():
        return f"{p.parent.name} export"
    return p.stem if p.is_file() else p.name


class RequestError(ValueError):
    """A request the demo refuses (out of bounds, unknown choice, a bad setting): shown in the page as a message."""


@dataclass(frozen=True)
class Request:
    """What one Generate asks of every panel, as the page (or any API call) sends it: Demo.check checks it. The
    fields' order is the page's controls' (and the API's inputs') after the panels."""

    classes: Sequence[str]  # class names, one grid row each
    per_class: float  # images per class (Gradio sends numbers as floats: 4.0 is 4)
    steps: float
    cfg_scale: float
    seed: float
    guidance: str = CLASSIFIER_FREE  # one of Demo.guidances


@dataclass
class Checkpoint:
    """One loaded model, what the page calls it and what it can be sampled with."""

    label: str
    model: torch.nn.Module
    meta: dict
    vae: Any = None
    guide: torch.nn.Module | None = None  # autoguidance's weaker model (DemoConfig.guide), on the model's device
    guide_label: str | None = None  # what the page calls the guide

    @cached_property
    def objective(self):
        return objective_of(self.meta)

    @cached_property
    def samplers(self) -> list[str]:
        """The samplers valid for its objective, its default first."""
        obj = self.objective
        names = sorted(n for n, c in SAMPLERS.items() if obj.name in c.objectives)
        return [obj.default_sampler] + [n for n in names if n != obj.default_sampler]

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(i) for i in range(self.model.num_classes)]


def load_checkpoint(path: str, config: DemoConfig, device: str) -> Checkpoint:
    """One checkpoint of config (with its guide when config.guide is set), on device; a guide that cannot be found or
    does not fit the model is one line naming the checkpoint (dit.sampling.load_guide says what differs)."""
    model, meta = load_model(path, use_ema=config.use_ema)
    model = model.to(device).eval()
    vae = load_vae(config.vae or meta["vae"], device) if meta.get("latent") else None
    ckpt = Checkpoint(checkpoint_label(path), model, meta, vae)
    if config.guide is not None:
        try:
            ckpt.guide = load_guide(config.guide, path, model, meta, device, config.use_ema)
            ckpt.guide_label = checkpoint_label(guide_path(config.guide, path))
        except (ValueError, OSError) as e:
            raise ValueError(f"guide for {ckpt.label}: {e}") from None
    return ckpt


class Demo:
    """The page's logic without the page: checkpoints by label, requests checked against the bounds, grids."""

    def __init__(self, checkpoints: Sequence[Checkpoint], config: DemoConfig, device: torch.device | str = "cpu"):
        self.config, self.device = config, torch.device(device)
        self.checkpoints: dict[str, Checkpoint] = {}
        for ckpt in checkpoints:
            label, n = ckpt.label, 2
            while label in self.checkpoints or label == NONE:
                label, n = f"{ckpt.label} ({n})", n + 1
            ckpt.label = label
            self.checkpoints[label] = ckpt
        # the page's guidance choices -> SamplingSettings.guidance; autoguidance when every checkpoint has a guide
        self.guidances = {CLASSIFIER_FREE: "cfg"}
        if checkpoints and all(c.guide is not None for c in checkpoints):
            guides = dict.fromkeys(c.guide_label for c in checkpoints)  # one label for one guide of all
            self.guidances[f"autoguidance (guide: {', '.join(map(str, guides))})"] = "auto"
        if checkpoints and all(getattr(c.model, "g_embedder", None) is not None for c in checkpoints):
            self.guidances[INPUT_GUIDANCE] = "input"  # models trained with a guidance input: guided in one call

    @classmethod
    def load(cls, config: DemoConfig) -> Demo:
        """Load every checkpoint named in config, and its guide (once, at start: a bad path or a guide that does not
        fit fails here, not in the page)."""
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls([load_checkpoint(path, config, device) for path in config.checkpoint], config, device)

    @property
    def labels(self) -> list[str]:
        return list(self.checkpoints)

    @property
    def class_names(self) -> list[str]:
        """The class choices of the page: the first checkpoint's (another must know the same names)."""
        return next(iter(self.checkpoints.values())).class_names

    def check(self, label: str, sampler: str, request: Request) -> tuple[Checkpoint, SamplingSettings, list[int]]:
        """The request's values, checked as the page's controls would and more (an API call can send anything: a
        string, NaN, a value beyond a slider) -> what to sample: the checkpoint, the settings, the class ids.
        Every refusal names the field, the value and the bound."""
        c = self.config
        if not isinstance(label, str) or label not in self.checkpoints:
            raise RequestError(f"unknown checkpoint {label!r}; choose one of: {', '.join(self.checkpoints)}")
        ckpt = self.checkpoints[label]
        if not isinstance(sampler, str) or sampler not in ckpt.samplers:
            raise RequestError(
                f"sampler {sampler!r} cannot sample {label} ({ckpt.objective.name} objective); "
                f"valid: {', '.join(ckpt.samplers)}"
            )
        classes = request.classes
        listed = isinstance(classes, Sequence) and not isinstance(classes, str)
        if not listed or not all(isinstance(name, str) for name in classes):
            raise RequestError(f"classes {classes!r}: need a list of class names")
        if not classes:
            raise RequestError("choose at least one class")
        per_class = _integer("per class", request.per_class, 1, c.max_images)
        steps = _integer("steps", request.steps, 1, c.max_steps)
        _integer("seed", request.seed, 0, MAX_SEED)
        n = len(classes) * per_class
        if n > c.max_images:
            raise RequestError(
                f"{len(classes)} classes x {per_class} per class = {n} images: at most {c.max_images} a request"
            )
        cfg_scale, (lo, hi) = request.cfg_scale, c.cfg_range
        number = isinstance(cfg_scale, Real) and not isinstance(cfg_scale, bool) and math.isfinite(cfg_scale)
        if not number or not lo <= cfg_scale <= hi:  # NaN compares False with any bound: asked to be finite first
            raise RequestError(f"guidance scale {cfg_scale!r}: need a number from {lo} to {hi}")
        guidance = request.guidance
        if not isinstance(guidance, str) or guidance not in self.guidances:
            raise RequestError(f"unknown guidance {guidance!r}; choose one of: {', '.join(self.guidances)}")
        try:
            ids = resolve_classes(list(classes), ckpt.meta.get("class_names"), ckpt.model.num_classes)
        except ValueError as e:  # e.g. a class name this checkpoint lacks
            names = ckpt.class_names
            valid = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            raise RequestError(f"{label}: {e}; classes: {valid}") from None
        auto = self.guidances[guidance] == "auto"
        try:
            settings = SamplingSettings(
                sampler=sampler,
                steps=steps,
                cfg_scale=float(cfg_scale),
                guidance=self.guidances[guidance],
                guide=c.guide if auto else None,
            )
        except (ValueError, KeyError) as e:
            raise RequestError(str(e)) from None
        return ckpt, settings, ids

    def grid(
        self, label: str, sampler: str, request: Request, on_eval: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """One grid (H, W, 3) uint8, one row per class, per_class images in each: sample.py's grid.png for the
        same settings (guidance=auto with the same guide too). on_eval(model evaluations so far) after each
        evaluation, for a progress bar."""
        ckpt, settings, ids = self.check(label, sampler, request)
        per_class, seed = int(request.per_class), int(request.seed)
        guide = ckpt.guide if settings.guidance == "auto" else None
        try:
            spec = GenerationSpec(make_labels(ids, per_class, None, seed), self.config.batch_size, seed)
            counting = None if on_eval is None else _counting(on_eval)
            built_sampler = build_sampler(ckpt.objective, settings)
            batches = generate(
                ckpt.model, built_sampler, spec, vae=ckpt.vae, device=self.device, on_eval=counting, guide=guide
            )
            images = torch.cat([images for _, images in batches])
        except ValueError as e:  # e.g. classifier-free guidance on a model without a null class
            raise RequestError(f"{label}: {e}") from None
        return grid_array(images, nrow=per_class)

    def grids(self, panels: Sequence[tuple[str, str]], request: Request, progress: Callable) -> list[np.ndarray]:
        """The grid of every (checkpoint label, sampler) panel, all checked before any sampling starts.
        progress((evaluations done, of total), desc=, unit=): one bar over every panel (Gradio's gr.Progress)."""
        for label, sampler in panels:
            self.check(label, sampler, request)
        n = len(request.classes) * int(request.per_class)
        batches = -(-n // self.config.batch_size)  # of each panel
        total = sum(evaluations(int(request.steps), sampler) * batches for _, sampler in panels)
        grids, before = [], 0
        for label, sampler in panels:
            report = lambda k, label=label, before=before: progress(
                (min(before + k, total), total), desc=f"sampling {label}", unit="model evaluations"
            )
            progress((before, total), desc=f"sampling {label}", unit="model evaluations")
            grids.append(self.grid(label, sampler, request, on_eval=report))
            before += evaluations(int(request.steps), sampler) * batches
        return grids


def evaluations(steps: int, sampler: str) -> int:
    """The model evaluations of one batch, as a progress bar's total: the sampler's calls a step (Heun two; an
    estimate: the bar is clamped to it)."""
    return steps * SAMPLERS[sampler].calls_per_step


def _integer(name: str, value, lo: int, hi: int) -> int:
    """A whole number from lo to hi, from the page or an API call (Gradio sends sliders' and numbers' values as
    floats: 4.0 is 4; 4.5, NaN, infinity, a string or None are refused, with the bounds)."""
    whole = isinstance(value, Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not lo <= value <= hi:
        raise RequestError(f"{name} {value!r}: need a whole number from {lo} to {hi}")
    return int(value)


def _counting(report: Callable[[int], None]) -> Callable[[int, int], None]:
    """generate()'s on_eval(batch start, evaluations in the batch) -> report(evaluations over all batches)."""
    done, last = 0, {}

    def on_eval(start: int, n: int) -> None:
        nonlocal done
        done += n - last.get(start, 0)
        last[start] = n
        report(done)

    return on_eval
