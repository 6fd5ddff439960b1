"""Our model as a diffusers DiTPipeline (python -m dit.hub.export --format diffusers).

What stops a model from being one (pipeline_obstacles), its scheduler (dit's dpmpp sampler, so the pipeline and
``sample.py sampler=dpmpp`` give the same images for the same seed), and the writing, with a measurement of how
far the pipeline's transformer is from the model. DiTPipeline hard-codes the null class as 1000: a model of K <
1000 classes gets a 1001-row label table (rows K..999 are copies of the null row, never a class). Imports
diffusers (seconds): dit.hub.export imports this module only for --format diffusers.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils import logging

from dit.diffusion import SamplingSettings, build_sampler
from dit.hub.convert import diffusers_obstacle, to_diffusers
from dit.hub.files import objective_of, objective_settings
from dit.integrity import read_json
from dit.models import DiT

__all__ = ["PIPELINE_NULL_CLASS", "pipeline_obstacles", "pipeline_scheduler", "write_pipeline"]

PIPELINE_NULL_CLASS = 1000  # DiTPipeline.__call__ guides with class_null = 1000, whatever the model
EXACT = 1e-4  # relative difference below which a converted transformer computes the model's function (fp32: ~1e-6)


def pipeline_obstacles(model: DiT, meta: dict) -> list[str]:
    """Why this model cannot be a DiTPipeline (empty: it can), each reason a clause naming it."""
    reasons = []
    if not meta.get("latent"):
        reasons.append("it generates pixels and DiTPipeline always decodes through a VAE (AutoencoderKL)")
    objective = objective_settings(meta)["name"]
    if objective == "flow":
        reasons.append(
            "it is a flow-matching model (velocity on t in [0, 1]) and DiTPipeline's schedulers are DDPM-family "
            "(epsilon on 1000 discrete timesteps)"
        )
    elif objective != "ddpm":
        reasons.append(f"its objective {objective!r} is not DDPM, the only one DiTPipeline's schedulers sample")
    if model.num_classes > PIPELINE_NULL_CLASS:
        reasons.append(f"it has {model.num_classes} classes and DiTPipeline hard-codes the null class as 1000")
    if why := diffusers_obstacle(model):
        reasons.append(why)
    return reasons


def pipeline_scheduler(meta: dict) -> DPMSolverMultistepScheduler:
    """The DiTPipeline's scheduler: the DPM-Solver++ scheduler of dit's dpmpp sampler for this objective (one
    definition: sampling the export with diffusers is sampling it with `sample.py sampler=dpmpp`)."""
    sampler = build_sampler(objective_of(meta), SamplingSettings(sampler="dpmpp"))
    return DPMSolverMultistepScheduler.from_config(sampler.scheduler.config)


def _load_vae(spec: str, in_channels: int) -> AutoencoderKL:
    try:
        vae = AutoencoderKL.from_pretrained(spec)
    except Exception as e:  # a missing path, no network for a hub id, not an AutoencoderKL
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"cannot load the VAE {spec!r} ({type(e).__name__}: {first}): "
            "give --vae <AutoencoderKL directory or hub id>"
        ) from None
    if vae.config.latent_channels != in_channels:
        raise ValueError(f"the VAE {spec!r} has {vae.config.latent_channels} latent channels, the model {in_channels}")
    return vae.eval()


def _probe_difference(model: DiT, transformer) -> tuple[float, float]:
    """(max |difference|, max |output|) of the model and the pipeline's transformer on a probe batch: four
    latents at timesteps across the chain, classes and the null class (1000 in the pipeline)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.tensor([0, 333, 666, 999])
    k = model.num_classes
    y = torch.tensor([0, k // 2, k - 1, k])
    with torch.no_grad():
        ours = model.eval()(x, t, y)
        theirs = transformer.eval()(x, t, torch.where(y == k, PIPELINE_NULL_CLASS, y)).sample
    return (ours - theirs).abs().max().item(), ours.abs().max().item()


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' progress bars and warnings off while the export is written and checked: they are about its own
    loading (e.g. id2label's JSON keys being strings, as in every DiTPipeline on the Hub), not about the export."""
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def write_pipeline(tmp: Path, model: DiT, meta: dict, vae_spec: str) -> str | None:
    """A DiTPipeline in tmp; returns how it differs from the model (None: it computes the same function)."""
    with warnings.catch_warnings(), _quiet_diffusers():  # the timestep-frequency warning: measured and said below
        warnings.simplefilter("ignore")
        transformer = to_diffusers(model, num_embeds=PIPELINE_NULL_CLASS)
        pipe = DiTPipeline(
            transformer=transformer, vae=_load_vae(vae_spec, model.in_channels), scheduler=pipeline_scheduler(meta)
        )
        pipe.save_pretrained(tmp)
        index = read_json(tmp / "model_index.json")
        if meta.get("class_names"):  # DiTPipeline takes id2label from model_index.json (pipe.labels, get_label_ids)
            index["id2label"] = {str(i): name for i, name in enumerate(meta["class_names"])}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        loaded = DiTPipeline.from_pretrained(tmp)  # as a user loads it
    diff, scale = _probe_difference(model, loaded.transformer)
    if diff <= EXACT * max(scale, 1.0):
        return None
    c, causes = model.config, []
    if c.timestep_freq_shift != 1:
        causes.append(
            f"diffusers' DiT embeds timesteps with downscale_freq_shift=1 and this model was trained with "
            f"timestep_freq_shift={c.timestep_freq_shift} (a model trained with model.timestep_freq_shift=1 "
            "exports exactly)"
        )
    if c.norm_eps != 1e-6:
        causes.append(f"diffusers' DiT normalises before attention with eps 1e-6 and this model with {c.norm_eps}")
    why = "; ".join(causes) or "a conversion difference dit does not know of (please report it)"
    return (
        f"The DiTPipeline's transformer computes a slightly different function than the model: its outputs differ by "
        f"up to {diff:.2g} (outputs up to {scale:.2g}) on a probe batch, because {why}. `--format ours` keeps the "
        "model exact."
    )
