"""Sampling throughput: our DDPM sampler against diffusers' DiTPipeline, same model, in one run.

Both run the same random-weight adaLN-Zero model (ours converted with to_diffusers, so the
networks are identical), the same number of steps, batch, guidance scale and VAE.

    python benchmarks/bench_sample.py                                   # CPU defaults (small model)
    python benchmarks/bench_sample.py --model DiT-XL/2 --steps 250 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline

from dit.diffusion import create_diffusion
from dit.models import create_model
from dit.models.convert import to_diffusers
from dit.sampling import generate


def tiny_vae():
    """A small random AutoencoderKL (8x): no download; decoding cost is the same for both sides."""
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/4")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256x256 images)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, in_channels=4, num_classes=1000, timestep_freq_shift=1)
    for prm in model.parameters():  # random weights (zero-init would make both sides trivially fast)
        prm.data.normal_(0, 0.02)
    model = model.to(device).eval()
    vae = tiny_vae().to(device).eval()
    pipe = DiTPipeline(transformer=to_diffusers(model).to(device).eval(), vae=vae, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    diffusion = create_diffusion(str(args.steps))
    labels = torch.arange(args.batch) % 1000

    def ours():
        for _ in generate(model, diffusion, labels, batch_size=args.batch, seed=0, cfg_scale=args.cfg, vae=vae, device=device):
            pass

    def theirs():
        pipe(
            class_labels=labels.tolist(),
            guidance_scale=args.cfg,
            num_inference_steps=args.steps,
            output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        )

    with torch.no_grad():
        ours(), theirs()  # warm-up
        t_ours = sorted(timed(ours, device) for _ in range(args.repeats))[args.repeats // 2]
        t_theirs = sorted(timed(theirs, device) for _ in range(args.repeats))[args.repeats // 2]
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"device: {dev}; torch {torch.__version__}")
    print(f"{args.model} latent {args.input_size}x{args.input_size}x4, {args.steps} DDPM steps, batch {args.batch}, cfg {args.cfg}")
    print(f"| sampler | s / batch (median of {args.repeats}) | images/s |")
    print("|---|---:|---:|")
    print(f"| dit (ours) | {t_ours:.2f} | {args.batch / t_ours:.3f} |")
    print(f"| diffusers DiTPipeline | {t_theirs:.2f} | {args.batch / t_theirs:.3f} |")
    print(f"speed-up (ours / diffusers): {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
