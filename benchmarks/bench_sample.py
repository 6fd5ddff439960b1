"""Sampling throughput: our DDPM sampler against diffusers' DiTPipeline, same model, in one run.

Both run the same random-weight adaLN-Zero model (ours converted with to_diffusers, so the
networks are identical), the same number of steps, batch, guidance scale and VAE.

    python benchmarks/bench_sample.py                                   # CPU defaults (small model)
    python benchmarks/bench_sample.py --model DiT-XL/2 --steps 250 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse

import torch
from common import header, median_time, setup_tf32, tiny_vae
from diffusers import DDPMScheduler, DiTPipeline

from dit.diffusion import SamplingSettings, build_objective, build_sampler
from dit.hub import to_diffusers
from dit.models import create_model
from dit.sampling import GenerationSpec, generate


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
    setup_tf32(device)

    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, in_channels=4, num_classes=1000, timestep_freq_shift=1)
    for prm in model.parameters():  # random weights (zero-init would make both sides trivially fast)
        prm.data.normal_(0, 0.02)
    model = model.to(device).eval()
    vae = tiny_vae(downsample=8).to(device).eval()  # random, built offline: decoding costs the same on both sides
    pipe = DiTPipeline(
        transformer=to_diffusers(model).to(device).eval(), vae=vae, scheduler=DDPMScheduler(num_train_timesteps=1000)
    )
    pipe.set_progress_bar_config(disable=True)
    sampler = build_sampler(build_objective(), SamplingSettings(sampler="ddpm", steps=args.steps, cfg_scale=args.cfg))
    labels = torch.arange(args.batch) % 1000
    spec = GenerationSpec(labels, batch_size=args.batch, seed=0)

    def ours(_call: int) -> None:
        for _ in generate(model, sampler, spec, vae=vae, device=device):
            pass

    def theirs(_call: int) -> None:
        pipe(
            class_labels=labels.tolist(),
            guidance_scale=args.cfg,
            num_inference_steps=args.steps,
            output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        )

    with torch.no_grad():  # one warm-up call each, then the median of --repeats
        t_ours = median_time(ours, args.repeats, warmup=1, device=device)
        t_theirs = median_time(theirs, args.repeats, warmup=1, device=device)
    header(device)
    print(
        f"{args.model} latent {args.input_size}x{args.input_size}x4, {args.steps} DDPM steps, "
        f"batch {args.batch}, cfg {args.cfg}"
    )
    print(f"| sampler | s / batch (median of {args.repeats}) | images/s |")
    print("|---|---:|---:|")
    print(f"| dit (ours) | {t_ours:.2f} | {args.batch / t_ours:.3f} |")
    print(f"| diffusers DiTPipeline | {t_theirs:.2f} | {args.batch / t_theirs:.3f} |")
    print(f"speed-up (ours / diffusers): {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
