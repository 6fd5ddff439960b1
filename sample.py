"""Sample class-conditional images from a DiT: ours, an official facebookresearch/DiT .pt, or diffusers.

    python sample.py checkpoint=<dir-or-.pt> classes=[0,3,7] per_class=8 cfg_scale=4
    python sample.py checkpoint=<...> num_images=50000 out_dir=samples/fid     # PNGs + ADM npz
    python sample.py checkpoint=<silhouette model> maps=fashion_mnist:test per_class=8     # + maps.png, map_iou
    accelerate launch sample.py checkpoint=<...> num_images=50000            # several GPUs

Writes <out_dir>/grid.png (one row per class) and, for FID, <out_dir>/images/*.png and
<out_dir>/samples.npz (arr_0: uint8 NHWC, arr_1: labels) of exactly N images.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from dit.atomic import atomic_file, fsync_tree, replace_dir
from dit.diffusion import SamplingSettings, build_sampler, check_sampling
from dit.hub import load_model, objective_of
from dit.models.spatial import map_images, map_iou
from dit.sampling import (
    GenerationSpec,
    condition_maps,
    generate,
    load_guide,
    load_vae,
    make_labels,
    resolve_classes,
    save_grid,
    save_npz_atomic,
)
from dit.training.config import register_configs

register_configs()  # configs/sample.yaml's schema (SampleConfig) and the resolvers

OUTPUTS = ("grid.png", "samples.npz", "images", "maps.png", "map_iou.json")


@dataclass(frozen=True)
class Draw:
    """What sample.py draws, in the global order of the images, and how its grid shows them."""

    labels: torch.Tensor  # (N,) one class id per image
    classes: list[int]  # the classes asked for: the grid's rows, in this order
    per_row: int | None  # images per grid row (the first of each class)
    class_names: list[str] | None = None
    maps: torch.Tensor | None = None  # a spatial-condition model: one map per image (GenerationSpec.maps)


def plan(cfg: DictConfig, model, class_names: list[str] | None) -> Draw:
    """The images cfg asks for: per_class of each class (a grid) or num_images (FID); for a model with a spatial
    condition, the labels and maps of the images in cfg.maps."""
    spec = OmegaConf.to_object(cfg.classes) if cfg.classes is not None else None
    classes = resolve_classes(spec, class_names, model.num_classes)
    if model.map_kind is not None:  # a spatial condition: the labels and maps of the images in cfg.maps
        if cfg.maps is None:
            raise ValueError(
                f"this model reads a {model.map_kind.name} map with each image: give maps= (a dataset split such as "
                "fashion_mnist:test, an image folder or an npz)"
            )
        labels, maps, per_row = condition_maps(cfg.maps, model, classes, cfg.per_class, cfg.num_images)
        return Draw(labels, classes, per_row, class_names, maps)
    if cfg.maps is not None:
        raise ValueError(f"maps={cfg.maps}: this model takes no spatial condition (its model.cond_map is null)")
    return Draw(make_labels(classes, cfg.per_class, cfg.num_images, cfg.seed), classes, cfg.per_class, class_names)


def writes_images(cfg: DictConfig) -> bool:
    """PNG files and the npz: write_images, or by default only for FID (num_images set)."""
    return cfg.num_images is not None if cfg.write_images is None else cfg.write_images


def run(cfg: DictConfig) -> Path:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out_dir)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise SystemExit(
            f"error: {out} already holds samples ({', '.join(existing)}); pass overwrite=true or another out_dir"
        )

    settings = check_sampling(SamplingSettings.from_config(cfg))  # checked before the model is loaded
    model, meta = load_model(cfg.checkpoint, use_ema=cfg.use_ema)
    model = model.to(accelerator.device).eval()
    # The objective the model was trained with (its schedule, ...), as its checkpoint records it.
    sampler = build_sampler(objective_of(meta), settings)
    draw = plan(cfg, model, meta.get("class_names"))
    vae = load_vae(cfg.vae or meta["vae"], accelerator.device) if meta.get("latent") else None
    spec = GenerationSpec(draw.labels, cfg.batch_size, cfg.seed, maps=draw.maps, rank=rank, world_size=world)
    guide = None
    if settings.guidance == "auto" and settings.guide is not None:  # the weaker model (guide=<path> or @STEP)
        guide = load_guide(settings.guide, cfg.checkpoint, model, meta, accelerator.device, cfg.use_ema)
    # generate() checks the model (and guide) against the sampler now, before anything is written
    batches = generate(model, sampler, spec, vae=vae, device=accelerator.device, guide=guide)

    out.mkdir(parents=True, exist_ok=True)
    parts = out / ".parts"
    if accelerator.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    accelerator.wait_for_everyone()
    index, chunks = [], []
    bar = tqdm(total=len(draw.labels), unit="img", desc="sampling", disable=not accelerator.is_main_process)
    for start, images in batches:
        index.append(torch.arange(start, start + len(images)))
        chunks.append(images)
        if writes_images(cfg):
            for i, img in zip(index[-1].tolist(), images):
                arr = img.numpy()
                Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(parts / f"{i:06d}.png")
        bar.update(min(len(images) * world, bar.total - bar.n))  # the other ranks progress at the same pace
    bar.close()
    if chunks:
        np.savez(parts / f"rank{rank}.npz", index=torch.cat(index).numpy(), images=torch.cat(chunks).numpy())
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_outputs(out, parts, draw, cfg, model, world)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def write_outputs(out: Path, parts: Path, draw: Draw, cfg: DictConfig, model, world: int) -> None:
    """The main process: the ranks' shards in global order -> grid.png (and maps.png, the maps in the same places,
    with map_iou printed and written to map_iou.json), and with write_images samples.npz and images/ (each written
    whole, then moved into place)."""
    shards = [np.load(p) for p in sorted(parts.glob("rank*.npz"))]
    order = np.concatenate([s["index"] for s in shards])
    images = np.concatenate([s["images"] for s in shards])[np.argsort(order)]
    labels = draw.labels
    assert len(images) == len(labels), (len(images), len(labels))
    # One row per class (classes absent from a small random draw are left out), short rows padded blank.
    rows = [ix for c in draw.classes if len(ix := np.flatnonzero(labels.numpy() == c)[: draw.per_row])]
    per_row = max(len(ix) for ix in rows)
    save_grid(_grid_cells(images, rows, per_row), nrow=per_row, path=out / "grid.png")
    iou_note = ""
    if draw.maps is not None:
        shown = map_images(draw.maps, model.input_size).numpy()
        save_grid(_grid_cells(shown, rows, per_row), nrow=per_row, path=out / "maps.png")
        iou_note = _write_map_iou(out / "map_iou.json", images, draw.maps, model, cfg.maps)
    if writes_images(cfg):
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)  # ADM tools expect RGB
        save_npz_atomic(out / "samples.npz", rgb, labels.numpy())
        (parts / "images").mkdir()
        for png in parts.glob("*.png"):
            png.rename(parts / "images" / png.name)
        fsync_tree(parts / "images")  # durable before it replaces an older images/ folder
        replace_dir(parts / "images", out / "images")
    shutil.rmtree(parts, ignore_errors=True)
    names = [draw.class_names[c] if draw.class_names else str(c) for c in draw.classes]
    print(
        f"wrote {len(labels)} images of {len(draw.classes)} classes "
        f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''}) "
        f"to {out} ({world} process{'es' if world > 1 else ''}){iou_note}"
    )


def _grid_cells(images: np.ndarray, rows: list[np.ndarray], per_row: int) -> torch.Tensor:
    """The grid's images (uint8 NHWC), row by row: each row's images, then blanks up to per_row."""
    blank = np.full_like(images[0], 255)
    return torch.from_numpy(np.stack([images[ix[j]] if j < len(ix) else blank for ix in rows for j in range(per_row)]))


def _write_map_iou(path: Path, images: np.ndarray, maps: torch.Tensor, model, source: str) -> str:
    """map_iou.json: the IoU of each sample's own map (the model's map_kind of the image) with the map it was drawn
    with; returns the note printed with it."""
    own = model.map_kind(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, model.map_size)
    iou = map_iou(own, maps.cpu())
    std = float(iou.std()) if len(iou) > 1 else 0.0
    record = {"map_iou": float(iou.mean()), "map_iou_std": std, "n": len(iou), "maps": source}
    atomic_file(path, lambda p: Path(p).write_text(json.dumps(record, indent=1) + "\n"))
    return f"; map_iou {record['map_iou']:.3f} (the IoU of each sample's own map with its map, mean of {len(iou)})"


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, OSError) as e:  # OSError: e.g. a full disk while writing samples
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
