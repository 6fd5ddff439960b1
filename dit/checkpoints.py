"""Model files: our exports, official DiT .pt files, diffusers directories; strict, pickle-free loading.

Our export is a directory:

    config.json          {"format": "dit", "model": DiT(...) kwargs, "data": {...}}
    ema.safetensors      EMA weights (what sampling uses by default)
    model.safetensors    raw weights (optional)

Training checkpoints (train.py) are such directories too, with the optimiser and RNG state beside.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dit.models import DiT

__all__ = [
    "save_export",
    "load_model",
    "load_state_dict_checked",
    "atomic_dir",
    "atomic_file",
    "FASHION_MNIST_CLASSES",
    "imagenet_class_names",
]

FORMAT = "dit"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_LATENT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of the released DiT checkpoints


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (shipped inside torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def atomic_file(path: str | Path, write, suffix: str = "") -> Path:
    """Create a file through write(tmp_path) in a temporary sibling, then rename it into place: readers
    see the old file or the new one, never a half-written one. suffix: what the writer appends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class atomic_dir:
    """Write a directory atomically: into a temporary sibling, renamed into place on success.

    An existing directory of the same name is replaced only after the new one is complete, so a
    crash at any point leaves either the old or the new directory, never a half-written one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_export(
    path: str | Path,
    model: DiT,
    ema: DiT | None = None,
    data: dict | None = None,
    extra_files: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write model (and EMA) weights with their config as one atomic directory; returns the path.
    `state_dict` replaces model.state_dict() (the gathered full weights of a sharded model)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "model": model.config, "data": data or {}}, indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(path)


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """load_state_dict(strict=True), with an error that names the file and every mismatched key/shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"checkpoint {source} does not fit the model config:"]
        if shapes:
            lines.append(f"  shape mismatches: {show(shapes)}")
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


FSDP_WEIGHTS = "pytorch_model_fsdp.bin"  # a full state dict of tensors (FSDP FULL_STATE_DICT), loaded weights_only


def _load_ours(path: Path, use_ema: bool, overrides: dict) -> tuple[DiT, dict]:
    meta = json.loads((path / "config.json").read_text())
    config = {**meta["model"], **overrides}
    weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").exists() else "model.safetensors")
    if not weights.exists() and (path / FSDP_WEIGHTS).exists():  # an FSDP training checkpoint (Accelerate's format)
        weights = path / FSDP_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{path} has no ema.safetensors, model.safetensors or {FSDP_WEIGHTS}")
    model = DiT(**config)
    state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu", weights_only=True)
    load_state_dict_checked(model, state, weights)
    data = meta.get("data", {})
    return model, dict(format="dit", weights=str(weights), **data)


def _load_official(path: Path, use_ema: bool, overrides: dict) -> tuple[DiT, dict]:
    from dit.models.convert import load_official_checkpoint

    model = load_official_checkpoint(path, use_ema, **overrides)
    names = imagenet_class_names() if model.num_classes == 1000 else None
    return model, dict(format="official", class_names=names, latent=True, vae=DEFAULT_LATENT_VAE)


def _load_diffusers(path: Path) -> tuple[DiT, dict]:
    from diffusers import DiTTransformer2DModel

    from dit.models.convert import from_diffusers

    pipeline = (path / "model_index.json").exists()
    transformer = DiTTransformer2DModel.from_pretrained(path / "transformer" if pipeline else path)
    model = from_diffusers(transformer)
    names = None
    if pipeline and (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        if index.get("id2label"):
            names = [index["id2label"][str(i)] for i in range(model.num_classes)]
    if names is None and model.num_classes == 1000:
        names = imagenet_class_names()
    vae = str(path / "vae") if pipeline and (path / "vae").exists() else DEFAULT_LATENT_VAE
    return model, dict(format="diffusers", class_names=names, latent=True, vae=vae)


def load_model(path: str | Path, use_ema: bool = True, **overrides) -> tuple[DiT, dict]:
    """Load any supported model file; returns (model, meta) with meta["class_names"], ["latent"], ["vae"].

    path: our export/checkpoint directory, an official facebookresearch/DiT .pt, or a diffusers
    DiTPipeline / DiTTransformer2DModel directory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        config = path / "config.json"
        if config.exists() and json.loads(config.read_text()).get("format") == FORMAT:
            return _load_ours(path, use_ema, overrides)
        if (path / "model_index.json").exists() or (
            config.exists() and json.loads(config.read_text()).get("_class_name") == "DiTTransformer2DModel"
        ):
            return _load_diffusers(path)
        raise ValueError(f"{path}: not a dit export, training checkpoint or diffusers DiT directory")
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_official(path, use_ema, overrides)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: give the directory that holds it (with its config.json), not the weights file")
    raise ValueError(f"{path}: unknown checkpoint format (expected a directory or an official .pt)")
