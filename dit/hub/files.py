"""Model files: our exports, official DiT .pt files, diffusers directories; strict, pickle-free loading.

This module only dispatches on the format; the pieces live where they belong: atomic writes in dit/atomic.py, strict
state-dict loading with the other readers of possibly damaged files (dit/integrity.py), official and diffusers
conversions in dit/hub/convert.py, class names with the datasets.

Our export is a directory:

    config.json          {"format": "dit", "model": DiT(...) architecture, "objective": {...}, "data": {...}}
    ema.safetensors      EMA weights (what sampling uses by default)
    model.safetensors    raw weights (optional)

"objective" holds the training objective's settings (dit.diffusion.build_objective rebuilds it), so
sampling uses the schedule the model was trained with. Files written before it existed lack the key
and mean DiT's default (DDPM, 1000 linear steps, learned-range variance): objective_settings says so,
the one place that rule is written. Training checkpoints (train.py) are such directories too, with the
optimiser and RNG state beside; a training add-on that wraps the model keeps the DiT's weights under a
prefix there (dit_state finds it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.atomic import atomic_dir
from dit.data.class_names import imagenet_class_names
from dit.diffusion import Objective, build_objective
from dit.hub.convert import from_diffusers, load_official_checkpoint
from dit.integrity import (
    DamagedFileError,
    load_safetensors,
    load_state_dict_checked,
    read_json,
    safetensors_problem,
    zip_problem,
)
from dit.models import DiT, DiTConfig, check_config

__all__ = [
    "FORMAT",
    "ModelRecord",
    "dit_state",
    "export_config",
    "load_model",
    "objective_of",
    "objective_settings",
    "save_export",
]

FORMAT = "dit"
DEFAULT_LATENT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of the released DiT checkpoints
FSDP_WEIGHTS = "pytorch_model_fsdp.bin"  # a full state dict of tensors (FSDP FULL_STATE_DICT), loaded weights_only
PATCH_EMBED_KEY = "x_embedder.proj.weight"  # every DiT has it, whatever its block: where its own keys sit


@dataclass(frozen=True)
class ModelRecord:
    """What config.json records beside the architecture: how the model was trained, on what, from what."""

    objective: dict = field(default_factory=dict)  # Objective.settings(); {} = DiT's DDPM (objective_settings)
    data: dict = field(default_factory=dict)  # the data's meta: name, class_names, latent, vae, ...
    init_from: dict | None = None  # a fine-tune: the weights it started from (dit.init_from's record)
    ema: dict | None = None  # EMA weights chosen after training: {"kind": "power", "sigma_rel", "step"} (dit.phema)


def save_export(
    path: str | Path,
    model: DiT,
    record: ModelRecord | None = None,
    *,
    ema: DiT | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write model (and EMA) weights with their config as one atomic directory; returns the path.
    `state_dict` replaces model.state_dict() (the gathered full weights of a sharded model)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(export_config(model, record), indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    return Path(path)


def export_config(model: DiT, record: ModelRecord | None = None) -> dict:
    """What config.json holds: the format tag, the architecture, the objective, the data, and for a fine-tune
    the weights it started from ("init_from")."""
    record = record or ModelRecord()
    config = {
        "format": FORMAT,
        "model": model.config.architecture(),
        "objective": record.objective or {},
        "data": record.data or {},
    }
    return (
        config
        | ({"init_from": record.init_from} if record.init_from else {})
        | ({"ema": record.ema} if record.ema else {})
    )


def objective_settings(meta: dict) -> dict:
    """The objective settings a model file records (config.json or load_model's meta: its "objective"). None
    recorded (our files written before objectives were, official DiT .pt files, diffusers models) means the
    objective all of those were trained with: DiT's DDPM (1000 linear steps, learned-range variance)."""
    return dict(meta.get("objective") or build_objective("ddpm").settings())


def objective_of(meta: dict) -> Objective:
    """The objective a model was trained with, rebuilt from what its file records (objective_settings)."""
    return build_objective(**objective_settings(meta))


def dit_state(state: dict) -> dict:
    """The DiT's own tensors of a training state, under the DiT's names. A training add-on that wraps the model
    (DDP's module., an extra loss with its own head beside the DiT, ...) keeps the DiT under a prefix: the one
    before the patch embedding's key. Only the tensors under it are the DiT's; with no prefix, or more than one
    DiT in the state, the state is returned as it is (strict loading then names what does not fit)."""
    if PATCH_EMBED_KEY in state:
        return state
    prefixes = {k[: -len(PATCH_EMBED_KEY)] for k in state if k.endswith("." + PATCH_EMBED_KEY)}
    if len(prefixes) != 1:
        return state
    (prefix,) = prefixes
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _architecture(path: Path, overrides: dict) -> tuple[DiTConfig, dict]:
    """(the DiTConfig, config.json's contents) of our export or checkpoint; overrides: runtime options such as
    fused_adaln."""
    meta = read_json(path / "config.json")
    if not isinstance(meta.get("model"), dict):
        raise DamagedFileError(path / "config.json", 'no "model" architecture in it')
    try:
        config = DiTConfig.from_dict(meta["model"], path / "config.json")
        check_config(config)  # what only the block registry knows (the block's name, its map)
    except (TypeError, ValueError) as e:
        raise DamagedFileError(path / "config.json", f'its "model" is not a DiT architecture ({e})') from None
    return dataclasses.replace(config, **overrides), meta


def _load_ours(path: Path, use_ema: bool, overrides: dict) -> tuple[DiT, dict]:
    config, meta = _architecture(path, overrides)
    weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").exists() else "model.safetensors")
    if not weights.exists() and (path / FSDP_WEIGHTS).exists():  # an FSDP training checkpoint (Accelerate's format)
        weights = path / FSDP_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights} is missing (the weights: ema.safetensors, model.safetensors or {FSDP_WEIGHTS})"
        )
    model = DiT(config)
    state = load_safetensors(weights) if weights.suffix == ".safetensors" else _load_torch(weights)
    load_state_dict_checked(model, dit_state(state), weights)
    data = meta.get("data", {})
    return model, dict(format="dit", weights=str(weights), objective=objective_settings(meta), **data)


def _load_torch(path: Path) -> dict:
    """A torch.save'd state dict of tensors (weights_only: no pickled code runs)."""
    if problem := zip_problem(path):
        raise DamagedFileError(path, problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the zip directory looked whole but a record does not load
        raise DamagedFileError(path, f"unreadable torch file ({type(e).__name__}: {e})") from None


# What torch.save wrote before zip archives (torch < 1.6): pickle protocol 2, then the magic number
# 0x1950a86a20f9469cfc6c.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _load_official(path: Path, use_ema: bool, overrides: dict) -> tuple[DiT, dict]:
    if path.stat().st_size == 0:
        raise DamagedFileError(path, "empty file (0 bytes)")
    with path.open("rb") as f:
        start = f.read(len(LEGACY_TORCH_MAGIC))
    if start[:2] == b"PK":  # torch >= 1.6 saves zip archives
        if problem := zip_problem(path):
            raise DamagedFileError(path, problem)
    elif start != LEGACY_TORCH_MAGIC:
        raise DamagedFileError(path, "neither a torch zip archive nor a legacy torch file (unknown first bytes)")
    try:
        model = load_official_checkpoint(path, use_ema, **overrides)
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # loaded, but not the structure of a DiT state dict
        raise ValueError(f"{path}: not an official DiT checkpoint ({type(e).__name__}: {e})") from None
    names = imagenet_class_names() if model.num_classes == 1000 else None
    return model, dict(
        format="official", class_names=names, latent=True, vae=DEFAULT_LATENT_VAE, objective=objective_settings({})
    )


def _load_diffusers(path: Path) -> tuple[DiT, dict]:
    from diffusers import DiTTransformer2DModel  # diffusers takes seconds to import: only diffusers files need it

    pipeline = (path / "model_index.json").exists()
    index = read_json(path / "model_index.json") if pipeline else {}
    folder = path / "transformer" if pipeline else path
    read_json(folder / "config.json")
    for weights in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise DamagedFileError(weights, problem)
    try:
        transformer = DiTTransformer2DModel.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{folder}: cannot load the diffusers DiT ({type(e).__name__}: {first_line})") from None
    model = from_diffusers(transformer)
    names = None
    if pipeline:
        if index.get("id2label"):
            names = [index["id2label"][str(i)] for i in range(model.num_classes)]
    if names is None and model.num_classes == 1000:
        names = imagenet_class_names()
    vae = str(path / "vae") if pipeline and (path / "vae").exists() else DEFAULT_LATENT_VAE
    return model, dict(format="diffusers", class_names=names, latent=True, vae=vae, objective=objective_settings({}))


def load_model(path: str | Path, use_ema: bool = True, **overrides) -> tuple[DiT, dict]:
    """Load any supported model file; returns (model, meta) with meta["class_names"], ["latent"], ["vae"]
    and ["objective"] (settings for dit.diffusion.build_objective, objective_settings; objective_of builds it).

    path: our export/checkpoint directory, an official facebookresearch/DiT .pt, or a diffusers
    DiTPipeline / DiTTransformer2DModel directory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        config = read_json(path / "config.json") if (path / "config.json").exists() else {}
        if not isinstance(config, dict):
            raise DamagedFileError(path / "config.json", f"a JSON {type(config).__name__}, not an object")
        if config.get("format") == FORMAT:
            return _load_ours(path, use_ema, overrides)
        if (path / "model_index.json").exists() or config.get("_class_name") == "DiTTransformer2DModel":
            return _load_diffusers(path)
        if not config and any(
            (path / name).exists() for name in ("ema.safetensors", "model.safetensors", FSDP_WEIGHTS)
        ):
            raise FileNotFoundError(
                f"{path / 'config.json'} is missing (an export or checkpoint keeps its architecture there)"
            )
        raise ValueError(f"{path}: not a dit export, training checkpoint or diffusers DiT directory")
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_official(path, use_ema, overrides)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: give the directory that holds it (with its config.json), not the weights file")
    raise ValueError(f"{path}: unknown checkpoint format (expected a directory or an official .pt)")
