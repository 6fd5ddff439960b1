"""Class-conditional image generation: labels, batched sampling, VAE decoding, grids and files.

What to draw travels as a GenerationSpec (the labels, with a spatial condition's maps, the batch size, the
seed, this process's share). Seeding is per batch of the global image list (batch b uses seed (seed, b)), so
the same seed gives the same images whatever the number of processes.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image
from torchvision.utils import make_grid

from dit.atomic import atomic_file
from dit.diffusion import Sampler, SamplingSettings
from dit.eval.stats import ImageSource
from dit.hub import load_model, objective_settings

__all__ = [
    "GenerationSpec",
    "check_guide",
    "guide_path",
    "load_guide",
    "SampleConfig",
    "condition_maps",
    "decode",
    "generate",
    "grid_array",
    "load_vae",
    "make_labels",
    "resolve_classes",
    "save_grid",
    "save_npz_atomic",
    "to_uint8",
]


@dataclass
class SampleConfig(SamplingSettings):
    """sample.py's settings, the schema of configs/sample.yaml: the sampling keys are SamplingSettings's (the
    same as training.grid_sampling / fid_sampling), so ``python sample.py sampler=ddim steps=50 cfg_scale=4``;
    a wrong type fails when the config is composed, a bad value when sample.py starts (SamplingSettings).
    The objective (schedule, ...) comes from the checkpoint; the sampling keys choose how to sample it:
    sampler null = the objective's default (DDPM models: ddpm | ddim | dpmpp | unipc; flow: euler | heun | dpmpp |
    euler_maruyama; MeanFlow and shortcut models: meanflow (= shortcut) | euler | heun | dpmpp); options are the
    sampler's (on the command line ``+options={eta:1.0}``), e.g. ddim {eta: 0.0,
    clip_denoised: true}, ddpm {variance_type: fixed_small}, dpmpp {order: 2, use_karras_sigmas: false},
    euler_maruyama {diffusion_form: sigma}."""

    checkpoint: str = MISSING  # our export/checkpoint dir, an official DiT .pt, or a diffusers directory
    use_ema: bool = True  # our checkpoints: EMA weights (false: raw weights)
    out_dir: str = "samples"  # refuses to overwrite existing samples unless overwrite=true
    overwrite: bool = False
    classes: Any = None  # ids and/or names, e.g. [0,3] or ["golden retriever",otter]; null = every class
    per_class: int = 8  # images per class: the grid has one row per class
    num_images: int | None = None  # N: exactly N images for FID (labels uniform over `classes`) -> PNGs + npz
    seed: int = 0
    batch_size: int = 64  # per process
    cfg_scale: float = 4.0  # classifier-free guidance; 1 = unguided
    vae: str | None = None  # latent models: diffusers AutoencoderKL hub id or local path (default: from checkpoint)
    write_images: bool | None = None  # PNG files + npz; null = only when num_images is set
    # A model with a spatial condition (model.cond_map): the images whose maps it samples from: a dataset split
    # (fashion_mnist:test: each map with its own label), an image folder or an ADM npz (labelled: the same; no labels:
    # every map with every class of `classes`). Writes maps.png beside grid.png and reports map_iou.
    maps: str | None = None


def resolve_classes(
    spec: Sequence[int | str] | int | str | None, class_names: list[str] | None, num_classes: int
) -> list[int]:
    """Class ids from ids and/or names (case-insensitive); None = every class."""
    if spec is None:
        return list(range(num_classes))
    if isinstance(spec, (int, str)):
        spec = [spec]
    lookup = {n.lower(): i for i, n in enumerate(class_names or [])}
    ids = []
    for item in spec:
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            i = int(item)
            if not 0 <= i < num_classes:
                raise ValueError(f"class id {i} outside [0, {num_classes - 1}]")
            ids.append(i)
        elif item.strip().lower() in lookup:
            ids.append(lookup[item.strip().lower()])
        else:
            close = difflib.get_close_matches(item.lower(), list(lookup), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(repr(class_names[lookup[c]]) for c in close)}" if close else ""
            known = "" if class_names else " (this model has no class names: use ids)"
            raise ValueError(f"unknown class name {item!r}{hint}{known}")
    return ids


def make_labels(classes: list[int], per_class: int | None, num_images: int | None, seed: int) -> torch.Tensor:
    """per_class of each class in order (a grid), or num_images labels cycling through the classes,
    drawn uniformly at random (seeded) when every class is asked for (FID)."""
    if num_images is None:
        return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(classes, dtype=torch.long)[torch.randint(len(classes), (num_images,), generator=g)]


@torch.no_grad()
def condition_maps(
    spec: str, model, classes: list[int], per_class: int | None, num_images: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(labels, maps, images per grid row) to sample a spatial-condition model from the images of ``spec`` (an
    ImageSource: dataset split, image folder, npz). Labelled images: each map with its own label, the first
    ``per_class`` of every class in ``classes`` (or the first ``num_images`` of those classes). Unlabelled: every
    map with every class (rows = classes, one column per image). Images smaller than the model's input are centred
    on a black canvas (as the Fashion-MNIST data is padded), others resized."""
    source = ImageSource(spec)
    size = model.input_size

    def canvas(x: torch.Tensor) -> torch.Tensor:  # uint8 (n, 3, H, W) -> (n, 3, size, size) in [-1, 1]
        x, side = x.float() / 127.5 - 1, x.shape[-1]
        if side < size and (size - side) % 2 == 0:
            return torch.nn.functional.pad(x, ((size - side) // 2,) * 4, value=-1.0)
        if x.shape[-2:] != (size, size):
            return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x

    step = 1 if source.files is not None else len(source)  # files may differ in size: one at a time
    x = torch.cat([canvas(source.batch(i, i + step)) for i in range(0, len(source), step)])
    maps = model.map_kind(x, model.map_size)
    if source.labels is None:
        n = len(maps)
        if num_images is not None:
            raise ValueError(f"maps={spec}: unlabelled images; give classes (each map is sampled with each class)")
        return torch.tensor(classes).repeat_interleave(n), maps.repeat(len(classes), 1, 1, 1), n
    labels = torch.as_tensor(source.labels)
    if num_images is not None:
        index = torch.isin(labels, torch.tensor(classes)).nonzero().flatten()[:num_images]
        if len(index) < num_images:
            raise ValueError(f"maps={spec}: {len(index)} images of the classes asked for, fewer than {num_images}")
    else:
        index = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in classes])
        if len(index) == 0:
            raise ValueError(f"maps={spec}: no images of the classes asked for")
    return labels[index], maps[index], per_class or 1


def decode(x: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE (scaling factor from its config); pixels pass through."""
    if vae is None:
        return x
    scale = getattr(vae.config, "scaling_factor", 0.18215)
    return vae.decode((x / scale).to(vae.dtype)).sample.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as the DiT sampler rounds them."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@dataclass(frozen=True)
class GenerationSpec:
    """What generate() draws: one image per label, in batches of batch_size; this process draws batches rank,
    rank + world_size, ... of them."""

    labels: torch.Tensor  # (N,) class ids
    batch_size: int
    seed: int  # batch b draws its noise from seed (seed, b): the images do not depend on world_size
    maps: torch.Tensor | None = None  # one spatial condition per label (N, C_m, s, s): a model with model.cond_map
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.maps is not None and len(self.maps) != len(self.labels):
            raise ValueError(f"{len(self.maps)} maps for {len(self.labels)} labels: one map per image")

    @property
    def batches(self) -> range:
        """This process's batches (indices into the global list of batches)."""
        return range(self.rank, (len(self.labels) + self.batch_size - 1) // self.batch_size, self.world_size)


def generate(
    model: torch.nn.Module,
    sampler: Sampler,
    spec: GenerationSpec,
    *,
    vae=None,
    device: torch.device | str = "cpu",
    on_eval: Callable[[int, int], None] | None = None,
    guide: torch.nn.Module | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first global index, uint8 NHWC images) for this rank's batches of spec, one at a time.

    sampler: from dit.diffusion.build_sampler (the model's objective + the sampling settings). The model is
    checked against it here, once, when generate() is called (not at the first batch).
    on_eval(first index of the batch, model evaluations of the batch so far): called after every (guided) model
    evaluation, for progress bars (python -m dit.demo); it does not change the images. guide: the weaker model of
    guidance=auto (load_guide), on the same device."""
    if not isinstance(sampler, Sampler):
        raise TypeError(
            "generate() takes a sampler (dit.diffusion.build_sampler(objective, SamplingSettings(...))), "
            f"not {type(sampler).__name__}"
        )
    shape = (model.in_channels, model.input_size, model.input_size)
    return _batches(sampler, sampler.denoiser(model, guide), shape, spec, vae=vae, device=device, on_eval=on_eval)


@torch.no_grad()
def _batches(sampler, denoiser, shape, spec: GenerationSpec, *, vae, device, on_eval):
    for b in spec.batches:
        first, last = b * spec.batch_size, (b + 1) * spec.batch_size
        y = spec.labels[first:last].to(device)
        g = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + b)
        noise = torch.randn(len(y), *shape, generator=g, device=device)
        fn = denoiser
        if spec.maps is not None:
            fn = functools.partial(fn, cond_map=spec.maps[first:last].to(device))
        if on_eval is not None:
            fn = _reporting(fn, lambda n, start=first: on_eval(start, n))
        x = sampler.run(fn, noise, y, g)
        yield first, to_uint8(decode(x, vae))


def _reporting(denoiser: Callable, report: Callable[[int], None]) -> Callable:
    """denoiser(x, t, y, **conditions) (a few-step model's interval h), calling report(evaluations so far) after each
    evaluation."""
    count = 0

    def fn(x, t, y, **kwargs):
        nonlocal count
        out = denoiser(x, t, y, **kwargs)
        count += 1
        report(count)
        return out

    return fn


def grid_array(images: torch.Tensor, nrow: int) -> np.ndarray:
    """uint8 NHWC images -> one (H', W', 3) uint8 grid with nrow images per row, 2 white pixels between them."""
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> None:
    """uint8 NHWC images -> one PNG grid with nrow images per row (atomic write)."""
    atomic_file(path, Image.fromarray(grid_array(images, nrow)).save, suffix=".png")


def save_npz_atomic(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM-format npz (arr_0 uint8 NHWC, arr_1 labels), written to a temporary file then renamed."""
    atomic_file(path, lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels), suffix=".npz")


def load_vae(spec: str, device):
    """A diffusers AutoencoderKL from a local directory or a hub id (offline: local only)."""
    from diffusers import AutoencoderKL  # diffusers takes seconds to import: only latent models need it

    try:
        return AutoencoderKL.from_pretrained(spec).to(device).eval()
    except Exception as e:
        raise SystemExit(
            f"error: cannot load the VAE {spec!r} ({type(e).__name__}): give vae=<local path or hub id>"
        ) from None


def guide_path(spec: str, checkpoint: str | Path) -> Path:
    """Where a guide lives: a path as given, or @STEP for the checkpoint at STEP of the run that `checkpoint` belongs
    to (checkpoint: <run>/model, <run>/checkpoints/step_*, <run>/phema_exports/*, or the run directory itself)."""
    if not spec.startswith("@"):
        return Path(spec)
    try:
        step = int(spec[1:])
    except ValueError:
        raise ValueError(f"guide={spec}: @ and a step number, e.g. @500") from None
    path = Path(checkpoint).absolute()  # the run: the nearest directory (itself or above) holding checkpoints/
    run = next((p for p in [path, *path.parents] if (p / "checkpoints").is_dir()), path.parent)
    found = run / "checkpoints" / f"step_{step:07d}"
    if not found.is_dir():
        steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"guide={spec}: no checkpoint {found}; the run has {', '.join(steps) or 'none'}")
    return found


def check_guide(model, meta: dict, guide, guide_meta: dict, where: Path) -> None:
    """A guide must denoise the same task: the same objective (its settings), classes, data shape and outputs; it may
    be smaller or less trained. One line naming what differs."""
    mine = {
        "objective": objective_settings(meta),
        "num_classes": model.num_classes,
        "input_size": model.input_size,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
    }
    theirs = {
        "objective": objective_settings(guide_meta),
        "num_classes": guide.num_classes,
        "input_size": guide.input_size,
        "in_channels": guide.in_channels,
        "out_channels": guide.out_channels,
    }
    differ = [f"{k}: guide {theirs[k]!r} vs model {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
    if differ:
        raise ValueError(f"guide {where} cannot guide this model: {'; '.join(differ)}")


def load_guide(spec: str, checkpoint: str | Path, model, meta: dict, device, use_ema: bool = True):
    """The guide of guidance=auto (guide_path), checked against the model (check_guide), on device, in eval mode."""
    path = guide_path(spec, checkpoint)
    guide, guide_meta = load_model(path, use_ema=use_ema)
    check_guide(model, meta, guide, guide_meta, path)
    return guide.to(device).eval()
