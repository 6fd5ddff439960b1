"""The settings digest: a SHA-256 of what a run's results depend on, recorded in finished.json so that a study
re-run leaves finished runs alone and retrains a run whose settings changed. Written in this one module.

What is left out, each rule read from where the fact lives:
- the fields a schema marks ``runtime`` (how a run computes, not what: DiTConfig.fused_adaln, TrainConfig's
  compile, num_workers, ...) or ``alias`` (DiTConfig.size, recorded through the sizes it sets);
- the fields a schema marks ``added_with_schema`` and the settings an objective lists in ADDED_SETTINGS, at their
  default: added after runs were recorded, so those runs keep their digest;
- a null sampler is recorded as the sampler it means (dit.diffusion.sampler_name), so naming the default sampler
  is the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from dit.diffusion import OBJECTIVES, SamplingSettings
from dit.models.config import DiTConfig
from dit.training.config import SAMPLING_PURPOSES, OptimConfig, TrainConfig, training_sampler

__all__ = ["schema_view", "settings_digest"]

SCHEMAS = {"model": DiTConfig, "training": TrainConfig, "optim": OptimConfig}  # config group -> its dataclass


def schema_view(schema, values: dict) -> dict:
    """A composed config group as the digest sees it: ``schema``'s runtime and alias fields left out, its
    added_with_schema fields left out at their default; keys the schema does not have (``_target_``) kept."""
    meta = {f.name: f for f in dataclasses.fields(schema)}

    def kept(key, value) -> bool:
        f = meta.get(key)
        if f is None:
            return True
        if f.metadata.get("runtime") or f.metadata.get("alias"):
            return False
        return not (f.metadata.get("added_with_schema") and value == _default(f))

    return {k: v for k, v in values.items() if kept(k, v)}


def _default(f: dataclasses.Field):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default


def settings_digest(config: dict) -> str:
    """SHA-256 of a run's seed and model, data, objective, optimiser and training settings (the resolved config
    train.py passes to the loop), as the module docstring says; init_from where a run has one."""
    kept = {k: config.get(k) for k in ("seed", "model", "data", "diffusion", "optim", "training")}
    for group, schema in SCHEMAS.items():
        if isinstance(kept[group], dict):
            kept[group] = schema_view(schema, kept[group])
    if isinstance(kept["diffusion"], dict):
        objective = kept["diffusion"]["name"]
        kept["diffusion"] = OBJECTIVES[objective].recorded(kept["diffusion"])
        if isinstance(kept["training"], dict):
            kept["training"] = _effective_samplers(kept["training"], objective)
    if config.get("init_from"):  # a fine-tune (absent otherwise, so the digests recorded before it still hold)
        kept["init_from"] = [config["init_from"], config.get("init_from_class_map")]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _effective_samplers(training: dict, objective: str) -> dict:
    """training with each sampling setting's null sampler replaced by the one the run uses."""
    out = dict(training)
    for key in SAMPLING_PURPOSES:
        if isinstance(out.get(key), dict):
            sampling = schema_view(SamplingSettings, out[key])
            out[key] = {**sampling, "sampler": training_sampler(key, out[key].get("sampler"), objective)}
    return out
