"""What every benchmark script shares: timing (warm-up, median, CUDA synchronised), the header that
records device, versions, date and command, TF32 set-up, and a small random VAE built offline.

Imported by the scripts in this folder as ``from common import ...`` (Python puts a script's own
folder first on sys.path, so ``python benchmarks/bench_*.py`` finds it from any directory).
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

__all__ = ["device_name", "header", "median", "median_time", "setup_tf32", "time_calls", "tiny_vae", "versions"]

median = statistics.median


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def time_calls(
    fn: Callable[[int], object], repeats: int, warmup: int = 1, device: torch.device | str | None = "cpu"
) -> list[float]:
    """Seconds of each of ``repeats`` calls fn(i), after ``warmup`` untimed calls.

    i counts every call, warm-up included (0, 1, 2, ...), so fn can rotate over inputs or data. On a
    CUDA device each call is timed with CUDA events after the device has finished earlier work, so
    the time covers the GPU work fn queued, not only its launch; on the CPU with perf_counter."""
    device = _device(device)
    cuda = device.type == "cuda"
    for i in range(warmup):
        fn(i)
    times = []
    for r in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + r)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
        else:
            t0 = time.perf_counter()
            fn(warmup + r)
            times.append(time.perf_counter() - t0)
    return times


def median_time(
    fn: Callable[[int], object], repeats: int, warmup: int = 1, device: torch.device | str | None = "cpu"
) -> float:
    """Median seconds of fn(i) over ``repeats`` timed calls after ``warmup`` untimed ones (see time_calls)."""
    return median(time_calls(fn, repeats, warmup, device))


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU's architecture and the threads torch uses."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions(device: torch.device | str | None = "cpu") -> dict[str, str]:
    """Versions of the packages the numbers depend on ("-" where one is not installed), and on a CUDA
    device the CUDA version torch was built with."""
    out = {"torch": torch.__version__}
    for pkg in ("triton", "diffusers", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "-"
    if _device(device).type == "cuda" and torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def header(device: torch.device | str | None = None, *, file=None, quiet: bool = False) -> dict[str, str]:
    """Print (unless quiet) and return what goes with every table: device, versions, UTC date, command.

    Two lines:  device: <name>; torch <v>, triton <v>, diffusers <v>, accelerate <v>[, cuda <v>]
                date: <UTC>; command: <the command line that ran>"""
    info = {
        "device": device_name(device),
        **versions(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *sys.argv]),
    }
    if not quiet:
        vers = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "diffusers", "accelerate", "cuda") if k in info)
        print(f"device: {info['device']}; {vers}", file=file)
        print(f"date: {info['date']}; command: {info['command']}", file=file)
    return info


def setup_tf32(device: torch.device | str | None) -> bool:
    """TF32 matmuls and convolutions on CUDA (as the training loop does with training.tf32=true).
    Returns whether it was turned on (never on the CPU)."""
    if _device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def tiny_vae(downsample: int = 8):
    """A small random diffusers AutoencoderKL, built from a config (never from the hub).

    downsample = 2 is the 658k-parameter test VAE (block_out_channels (32, 64)); the default 8 has
    the spatial factor of the Stable Diffusion VAE DiT uses (latent 32 -> 256x256 images) with
    channels (32, 32, 64, 64), so decoding costs the same for every side of a comparison."""
    from diffusers import AutoencoderKL

    levels = int(math.log2(downsample)) + 1
    if downsample < 1 or 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample={downsample}: need a power of two")
    return AutoencoderKL(
        block_out_channels=tuple(32 if i < levels // 2 else 64 for i in range(levels)),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
