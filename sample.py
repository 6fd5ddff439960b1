"""Sample class-conditional images from a DiT: ours, an official facebookresearch/DiT .pt, or diffusers.

    python sample.py checkpoint=<dir-or-.pt> classes=[0,3,7] per_class=8 cfg_scale=4
    python sample.py checkpoint=<...> num_images=50000 out_dir=samples/fid     # PNGs + ADM npz
    accelerate launch sample.py checkpoint=<...> num_images=50000            # several GPUs

Writes <out_dir>/grid.png (one row per class) and, for FID, <out_dir>/images/*.png and
<out_dir>/samples.npz (arr_0: uint8 NHWC, arr_1: labels) of exactly N images.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from dit.atomic import fsync_tree, replace_dir
from dit.diffusion import SamplingSettings, build_sampler
from dit.model_files import load_model, objective_of
from dit.sampling import generate, load_vae, make_labels, resolve_classes, save_grid, save_npz_atomic

OUTPUTS = ("grid.png", "samples.npz", "images")


def run(cfg: DictConfig) -> Path:
    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out_dir)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise SystemExit(
            f"error: {out} already holds samples ({', '.join(existing)}); pass overwrite=true or another out_dir"
        )

    settings = SamplingSettings.from_config(cfg)  # checked before the model is loaded
    model, meta = load_model(cfg.checkpoint, use_ema=cfg.use_ema)
    model = model.to(accelerator.device).eval()
    # The objective the model was trained with (its schedule, ...), as its checkpoint records it.
    sampler = build_sampler(objective_of(meta), settings)
    class_names = meta.get("class_names")
    classes = resolve_classes(
        OmegaConf.to_object(cfg.classes) if cfg.classes is not None else None, class_names, model.num_classes
    )
    labels = make_labels(classes, cfg.per_class, cfg.num_images, cfg.seed)
    vae = load_vae(cfg.vae or meta["vae"], accelerator.device) if meta.get("latent") else None
    write_images = cfg.num_images is not None if cfg.write_images is None else cfg.write_images
    # generate() checks the model against the sampler now, before anything is written
    batches = generate(
        model, sampler, labels, batch_size=cfg.batch_size, seed=cfg.seed, vae=vae, rank=rank, world_size=world,
        device=accelerator.device,
    )  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    parts = out / ".parts"
    if accelerator.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    accelerator.wait_for_everyone()
    index, chunks = [], []
    bar = tqdm(total=len(labels), unit="img", desc="sampling", disable=not accelerator.is_main_process)
    for start, images in batches:
        index.append(torch.arange(start, start + len(images)))
        chunks.append(images)
        if write_images:
            for i, img in zip(index[-1].tolist(), images):
                arr = img.numpy()
                Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(parts / f"{i:06d}.png")
        bar.update(min(len(images) * world, bar.total - bar.n))  # the other ranks progress at the same pace
    bar.close()
    if chunks:
        np.savez(parts / f"rank{rank}.npz", index=torch.cat(index).numpy(), images=torch.cat(chunks).numpy())
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_outputs(out, parts, labels, classes, cfg, write_images, class_names, world)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def write_outputs(out: Path, parts: Path, labels: torch.Tensor, classes: list[int], cfg: DictConfig, write_images: bool,
                  class_names: list[str] | None, world: int) -> None:  # fmt: skip
    """The main process: the ranks' shards in global order -> grid.png, and with write_images samples.npz and
    images/ (each written whole, then moved into place)."""
    shards = [np.load(p) for p in sorted(parts.glob("rank*.npz"))]
    order = np.concatenate([s["index"] for s in shards])
    images = np.concatenate([s["images"] for s in shards])[np.argsort(order)]
    assert len(images) == len(labels), (len(images), len(labels))
    # One row per class (classes absent from a small random draw are left out), short rows padded blank.
    rows = [ix for c in classes if len(ix := np.flatnonzero(labels.numpy() == c)[: cfg.per_class])]
    per_row = max(len(ix) for ix in rows)
    blank = np.full_like(images[0], 255)
    grid = [images[ix[j]] if j < len(ix) else blank for ix in rows for j in range(per_row)]
    save_grid(torch.from_numpy(np.stack(grid)), nrow=per_row, path=out / "grid.png")
    if write_images:
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)  # ADM tools expect RGB
        save_npz_atomic(out / "samples.npz", rgb, labels.numpy())
        (parts / "images").mkdir()
        for png in parts.glob("*.png"):
            png.rename(parts / "images" / png.name)
        fsync_tree(parts / "images")  # durable before it replaces an older images/ folder
        replace_dir(parts / "images", out / "images")
    shutil.rmtree(parts, ignore_errors=True)
    names = [class_names[c] if class_names else str(c) for c in classes]
    print(
        f"wrote {len(labels)} images of {len(classes)} classes "
        f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''}) "
        f"to {out} ({world} process{'es' if world > 1 else ''})"
    )


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, OSError) as e:  # OSError: e.g. a full disk while writing samples
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
