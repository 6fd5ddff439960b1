"""Encode a dataset once with a diffusers AutoencoderKL into latent shards that training reads.

    python -m dit.data.extract --root /data/imagenet/train --image-size 256 \\
        --vae stabilityai/sd-vae-ft-ema --out data/latents/imagenet256
    accelerate launch -m dit.data.extract ...        # several processes split the images

Stores, for both horizontal flips of every image, the posterior mean and std (fp16), so training
samples the latent anew each time (see dit.data.latents). With --pixels it also stores each image itself
(uint8, center-cropped, optionally resized to --pixel-size): what REPA's encoder reads during training
(ImageNet 256: about 196 KB per image, 250 GB in all; --pixel-size 224, REPA's encoder resolution: 150 KB).

Images are read and cropped by DataLoader workers (--workers) while the VAE encodes; each process takes every
num_processes-th image from its index, in order, so the shards are the same whatever the number of workers.
Written into the hidden sibling .<out>.tmp, fsynced and swapped in with dit.atomic.replace_dir when complete: a job
killed at any point leaves the old latents or the new ones (a rerun puts the old ones back if it was killed between
the swap's two renames, see dit.atomic.remove_stale_temporaries). An existing <out> is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dit.atomic import fsync_tree, remove_stale_temporaries, replace_dir
from dit.data.fashion_mnist import ROOT, FashionMNIST
from dit.data.image_folder import ImageFolder


def build_dataset(args):
    if args.source == "fashion_mnist":
        return FashionMNIST(root=args.root or ROOT, image_size=args.image_size, resize="bilinear")
    return ImageFolder(args.root, image_size=args.image_size, hflip=False, skip_corrupt=args.skip_corrupt)


def default_workers() -> int:
    """DataLoader workers per process: the CPUs this process may run on, shared among the node's processes
    (torchrun's LOCAL_WORLD_SIZE), at most 8 (more only wait on the VAE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


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
        "--workers",
        type=int,
        default=default_workers(),
        help="DataLoader worker processes reading the images, per process (0: the main process reads them; "
        "default: %(default)s, from the CPUs)",
    )
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


def share(dataset, process_index: int, num_processes: int) -> Subset:
    """This process's images: every num_processes-th from its own index, in order (its shards hold these)."""
    return Subset(dataset, range(process_index, len(dataset), num_processes))


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label) items -> images (n, channels, H, W), labels (n,) int64."""
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


def batches(images, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """The images in order, batch_size at a time, read by ``workers`` processes ahead of the VAE."""
    return DataLoader(
        images, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=pin_memory
    )


def encode(loader: DataLoader, vae, accelerator, writer: ShardWriter, pixels: bool, pixel_size) -> None:
    """This process's batches (see share), both flips, posterior mean and std in fp16; the images themselves
    (unflipped, uint8) with ``pixels``."""
    bar = tqdm(total=len(loader.dataset), unit="img", desc="encoding", disable=not accelerator.is_main_process)
    with torch.no_grad():
        for x, labels in loader:
            x = x.to(accelerator.device, non_blocking=loader.pin_memory)  # (n, channels, H, W) in [-1, 1]
            stored = {"pixels": to_pixels(x, pixel_size).cpu()} if pixels else {}
            if x.shape[1] == 1 and vae.config.in_channels == 3:
                x = x.repeat(1, 3, 1, 1)  # grey -> RGB for an RGB VAE
            both = torch.cat([x, x.flip(-1)])  # (2n, 3, H, W): original, flipped
            dist = vae.encode(both.to(vae.dtype)).latent_dist
            n = len(labels)
            writer.add(
                mean=torch.stack([dist.mean[:n], dist.mean[n:]], 1).half().cpu(),  # (n, 2, C, h, w)
                std=torch.stack([dist.std[:n], dist.std[n:]], 1).half().cpu(),
                labels=labels,
                **stored,  # (n, channels, H, W) uint8
            )
            bar.update(n)
    writer.flush()
    bar.close()


def finalize(dataset, vae, args, tmp: Path, out: Path, processes: int) -> None:
    """meta.json into tmp, everything in it fsynced, tmp swapped in as out (the main process, once every shard is
    written): killed at any point, out holds the old latents or the new ones (or, killed between the swap's two
    renames, the old ones wait as .<out>.old-<pid> for the next run to put them back)."""
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
    fsync_tree(tmp)
    replace_dir(tmp, out)
    print(f"wrote {len(dataset)} latents ({processes} process(es)) to {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")  # a temporary of dit.atomic's naming
    if args.pixel_size is not None and (not args.pixels or args.pixel_size < 1):
        raise SystemExit(f"error: --pixel-size {args.pixel_size}: needs --pixels and a size >= 1")
    if args.workers < 0:
        raise SystemExit(f"error: --workers {args.workers}: needs 0 or more")
    if accelerator.is_main_process:  # what a killed run of this output left: its .tmp; old latents put back
        remove_stale_temporaries(out.parent, deep=False, name=out.name)
    accelerator.wait_for_everyone()
    if (out / "meta.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds latents; pass --overwrite")
    try:
        dataset = build_dataset(args)
        vae = AutoencoderKL.from_pretrained(args.vae).to(accelerator.device).eval()
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if accelerator.is_main_process:
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    writer = ShardWriter(tmp, accelerator.process_index, args.shard_size)
    images = share(dataset, accelerator.process_index, accelerator.num_processes)
    loader = batches(images, args.batch_size, args.workers, pin_memory=accelerator.device.type == "cuda")
    encode(loader, vae, accelerator, writer, args.pixels, args.pixel_size)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize(dataset, vae, args, tmp, out, accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
