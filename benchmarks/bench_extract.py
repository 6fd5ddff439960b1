"""Latent extraction throughput: the image-by-image loop of dit.data.extract before issue 49 against its DataLoader
path (images read by worker processes while the VAE encodes), same images, same VAE, in one run.

    python benchmarks/bench_extract.py                 # 2,000 64x64 JPEGs, 2 workers, batch 32 (~5 min on 2 CPUs)
    python benchmarks/bench_extract.py --images 64     # a check that it runs

A generated image folder (10 classes of random 64x64 JPEGs, the layout dit.data.ImageFolder reads) and a small
random diffusers AutoencoderKL built from a config (common.tiny_vae: block_out_channels (32, 64), one layer per
block, 4 latent channels). Each path encodes every image once (both flips, shards written to a temporary folder
as the command writes them) after one untimed warm-up batch; the two outputs are checked byte for byte.

What the ratio can be: workers take the reading (JPEG decode, centre crop) off the main process, so the most they
gain is the reading's share of the time. With the VAE on a GPU, reading is most of the time; with the VAE on the
CPU it shares the cores with the workers and, at these sizes, takes nearly all of the time. So the same two loops
are timed once more with the VAE left out ("reading only": what the VAE waits for when it costs nothing, the GPU
case), and the VAE alone on one batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import header, tiny_vae
from PIL import Image

from dit.data import ImageFolder
from dit.data.extract import ShardWriter, batches, encode, share


def image_folder(root: Path, images: int, size: int, classes: int = 10) -> Path:
    """``images`` random size x size JPEGs (quality 90) in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def todays_loop(dataset, vae, device: torch.device, writer: ShardWriter, batch_size: int) -> None:
    """dit.data.extract's encode before issue 49 (one process, no --pixels), copied for the comparison: each batch's
    images read one by one on the main process while the VAE waits."""
    mine = list(range(len(dataset)))
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            items = [dataset[i] for i in mine[start : start + batch_size]]
            x = torch.stack([it[0] for it in items]).to(device)
            both = torch.cat([x, x.flip(-1)])  # (2n, 3, H, W): original, flipped
            dist = vae.encode(both.to(vae.dtype)).latent_dist
            n = len(items)
            writer.add(
                mean=torch.stack([dist.mean[:n], dist.mean[n:]], 1).half().cpu(),
                std=torch.stack([dist.std[:n], dist.std[n:]], 1).half().cpu(),
                labels=torch.tensor([int(it[1]) for it in items]),
            )
    writer.flush()


def read_one_by_one(dataset, batch_size: int) -> None:
    """Today's loop without the VAE: the batches read image by image on the main process."""
    for start in range(0, len(dataset), batch_size):
        torch.stack([dataset[i][0] for i in range(start, min(len(dataset), start + batch_size))])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64, help="side of the generated JPEGs, and of the crop the VAE encodes")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the new path")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the VAE runs")
    args = p.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        dataset = ImageFolder(image_folder(tmp / "images", args.images, args.size), image_size=args.size, hflip=False)
        torch.manual_seed(0)
        vae = tiny_vae(downsample=2).to(device).eval()
        n = len(dataset)
        x = torch.stack([dataset[i][0] for i in range(min(n, args.batch_size))]).to(device)
        with torch.no_grad():
            vae.encode(torch.cat([x, x.flip(-1)]))  # warm-up: the first call allocates and picks kernels
            t_vae = timed(lambda: vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean.cpu()) / len(x)
        pin = device.type == "cuda"
        t_read_old = timed(lambda: read_one_by_one(dataset, args.batch_size))
        t_read_new = timed(lambda: list(batches(share(dataset, 0, 1), args.batch_size, args.workers, pin)))

        old, new = tmp / "old", tmp / "new"
        old.mkdir()
        new.mkdir()
        t_old = timed(lambda: todays_loop(dataset, vae, device, ShardWriter(old, 0, 8192), args.batch_size))
        accelerator = SimpleNamespace(device=device, is_main_process=False)  # one process, no progress bar
        loader = batches(share(dataset, 0, 1), args.batch_size, args.workers, pin)
        t_new = timed(lambda: encode(loader, vae, accelerator, ShardWriter(new, 0, 8192), False, None))
        same = {f.name: f.read_bytes() for f in old.iterdir()} == {f.name: f.read_bytes() for f in new.iterdir()}

    header(device)
    print(
        f"{n} random {args.size}x{args.size} JPEGs, VAE {sum(q.numel() for q in vae.parameters()) / 1e3:.0f}k "
        f"parameters (block_out_channels (32, 64)) on {device.type}, batch {args.batch_size}, both flips"
    )
    print("| path | s | images/s |")
    print("|---|---:|---:|")
    print(f"| today's loop (images read one by one on the main process) | {t_old:.1f} | {n / t_old:.1f} |")
    print(f"| DataLoader, {args.workers} workers | {t_new:.1f} | {n / t_new:.1f} |")
    print(f"| reading only, today's loop | {t_read_old:.2f} | {n / t_read_old:.0f} |")
    print(f"| reading only, DataLoader, {args.workers} workers | {t_read_new:.2f} | {n / t_read_new:.0f} |")
    print(f"speed-up (DataLoader / today's loop): {t_old / t_new:.2f}x; reading only: {t_read_old / t_read_new:.2f}x")
    print(f"output byte-identical: {'yes' if same else 'NO'}; the VAE alone: {1 / t_vae:.1f} images/s (one batch)")
    if not same:
        raise SystemExit("error: the two paths wrote different shards")


if __name__ == "__main__":
    main()
