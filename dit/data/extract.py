"""Encode a dataset once with a diffusers AutoencoderKL into latent shards that training reads.

    python -m dit.data.extract --root /data/imagenet/train --image-size 256 \\
        --vae stabilityai/sd-vae-ft-ema --out data/latents/imagenet256
    accelerate launch -m dit.data.extract ...        # several processes split the images

Stores, for both horizontal flips of every image, the posterior mean and std (fp16), so training
samples the latent anew each time (see dit.data.latents). With --pixels it also stores each image itself
(uint8, center-cropped, optionally resized to --pixel-size): what REPA's encoder reads during training
(ImageNet 256: about 196 KB per image, 250 GB in all; --pixel-size 224, REPA's encoder resolution: 150 KB).
Written into <out>.tmp and renamed when complete; an existing <out> is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tqdm import tqdm

from dit.data.fashion_mnist import ROOT, FashionMNIST
from dit.data.image_folder import ImageFolder


def build_dataset(args):
    if args.source == "fashion_mnist":
        return FashionMNIST(root=args.root or ROOT, image_size=args.image_size, resize="bilinear")
    return ImageFolder(args.root, image_size=args.image_size, hflip=False, skip_corrupt=args.skip_corrupt)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dit.data.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=["imagefolder", "fashion_mnist"], default="imagefolder")
    p.add_argument("--root", help="image folder (one sub-folder per class); Fashion-MNIST: the idx folder")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub id or local directory")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard file")
    p.add_argument(
        "--skip-corrupt", action="store_true", help="leave unreadable images out (counted) instead of failing"
    )
    p.add_argument("--pixels", action="store_true", help="store the images too (uint8), for training.repa")
    p.add_argument(
        "--pixel-size", type=int, help="with --pixels: resize the stored images to this (default: as cropped)"
    )
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


class ShardWriter:
    """Collects this process's encoded batches and writes them as shard_<process>_<n>.safetensors."""

    def __init__(self, tmp: Path, process_index: int, shard_size: int):
        self.tmp, self.process_index, self.shard_size = tmp, process_index, shard_size
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.shard = 0

    def add(self, **tensors: torch.Tensor) -> None:
        """One batch: mean, std, labels, and pixels if stored."""
        for key, value in tensors.items():
            self.parts.setdefault(key, []).append(value)
        if sum(len(lb) for lb in self.parts["labels"]) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            save_file(
                {key: torch.cat(values).contiguous() for key, values in self.parts.items()},
                self.tmp / f"shard_{self.process_index:03d}_{self.shard:05d}.safetensors",
            )
            self.parts, self.shard = {}, self.shard + 1


def to_pixels(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (exact for images that were uint8), resized (bicubic, antialiased) if asked."""
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def encode(dataset, vae, accelerator, writer: ShardWriter, batch_size: int, pixels: bool, pixel_size) -> None:
    """This process's share of the images (every num_processes-th), both flips, posterior mean and std in fp16;
    the images themselves (unflipped, uint8) with ``pixels``."""
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    bar = tqdm(total=len(mine), unit="img", desc="encoding", disable=not accelerator.is_main_process)
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            items = [dataset[i] for i in mine[start : start + batch_size]]
            x = torch.stack([it[0] for it in items]).to(accelerator.device)
            stored = {"pixels": to_pixels(x, pixel_size).cpu()} if pixels else {}
            if x.shape[1] == 1 and vae.config.in_channels == 3:
                x = x.repeat(1, 3, 1, 1)  # grey -> RGB for an RGB VAE
            both = torch.cat([x, x.flip(-1)])  # (2n, 3, H, W): original, flipped
            dist = vae.encode(both.to(vae.dtype)).latent_dist
            n = len(items)
            writer.add(
                mean=torch.stack([dist.mean[:n], dist.mean[n:]], 1).half().cpu(),  # (n, 2, C, h, w)
                std=torch.stack([dist.std[:n], dist.std[n:]], 1).half().cpu(),
                labels=torch.tensor([int(it[1]) for it in items]),
                **stored,  # (n, channels, H, W) uint8
            )
            bar.update(n)
    writer.flush()
    bar.close()


def finalize(dataset, vae, args, tmp: Path, out: Path, processes: int) -> None:
    """meta.json into <out>.tmp, then <out>.tmp renamed to <out> (the main process, once every shard is written)."""
    meta = dict(
        count=len(dataset),
        num_classes=dataset.num_classes,
        class_names=list(dataset.class_names),
        image_size=args.image_size,
        vae=args.vae,
        scaling_factor=getattr(vae.config, "scaling_factor", 0.18215),
        source=args.source,
        root=args.root,
        pixels=(args.pixel_size or args.image_size) if args.pixels else None,  # the stored images' size
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {len(dataset)} latents ({processes} process(es)) to {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    out, tmp = Path(args.out), Path(args.out + ".tmp")
    if args.pixel_size is not None and (not args.pixels or args.pixel_size < 1):
        raise SystemExit(f"error: --pixel-size {args.pixel_size}: needs --pixels and a size >= 1")
    if (out / "meta.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds latents; pass --overwrite")
    try:
        dataset = build_dataset(args)
        vae = AutoencoderKL.from_pretrained(args.vae).to(accelerator.device).eval()
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    writer = ShardWriter(tmp, accelerator.process_index, args.shard_size)
    encode(dataset, vae, accelerator, writer, args.batch_size, args.pixels, args.pixel_size)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize(dataset, vae, args, tmp, out, accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
