"""Sampling throughput: our samplers against diffusers' DiTPipeline, same model, in one run.

Both run the same random-weight adaLN-Zero model (ours converted with to_diffusers, so the
networks are identical), the same batch and VAE; by default the same number of DDPM steps and guidance scale.
--ours names other samplers of ours (sampler:steps[:cfg scale]; a few-step sampler's model gains the interval input,
nothing else changes), each against DiTPipeline at --peer-steps (its default: 250): images per second of a one-call
MeanFlow model against the pipeline as people run it.

    python benchmarks/bench_sample.py                                   # CPU defaults (small model)
    python benchmarks/bench_sample.py --model DiT-XL/2 --steps 250 --batch 64 --device cuda
    python benchmarks/bench_sample.py --ours meanflow:1:1 meanflow:2:1 euler:25 --peer-steps 250
"""

from __future__ import annotations

import argparse

import torch
from common import header, median_time, setup_tf32, tiny_vae
from diffusers import DDPMScheduler, DiTPipeline

from dit.diffusion import SAMPLERS, SamplingSettings, build_objective, build_sampler
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
    p.add_argument("--ours", nargs="+", default=None, help="sampler:steps[:cfg] (default: ddpm:<steps>:<cfg>)")
    p.add_argument("--peer-steps", type=int, default=None, help="DiTPipeline's steps (default: --steps)")
    p.add_argument("--vae-downsample", type=int, default=8, help="the random VAE's factor (1: images of latent size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    setup_tf32(device)

    ours_specs = args.ours or [f"ddpm:{args.steps}:{args.cfg}"]
    peer_steps = args.peer_steps or args.steps

    def random_model(interval_input: bool = False):
        torch.manual_seed(0)
        model = create_model(
            args.model, input_size=args.input_size, in_channels=4, num_classes=1000, timestep_freq_shift=1,
            interval_input=interval_input,
        )  # fmt: skip
        for prm in model.parameters():  # random weights (zero-init would make both sides trivially fast)
            prm.data.normal_(0, 0.02)
        return model.to(device).eval()

    model = random_model()
    # random, built offline: decoding costs the same on both sides
    vae = tiny_vae(downsample=args.vae_downsample).to(device).eval()
    pipe = DiTPipeline(
        transformer=to_diffusers(model).to(device).eval(), vae=vae, scheduler=DDPMScheduler(num_train_timesteps=1000)
    )
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(args.batch) % 1000
    spec = GenerationSpec(labels, batch_size=args.batch, seed=0)

    def ours(text: str):
        """A timed call sampling with sampler:steps[:cfg] (the model of the sampler's first objective), its calls."""
        name, steps, *cfg = text.split(":")
        objective = build_objective(SAMPLERS[name].objectives[0])
        net = random_model(True) if objective.interval_input else model
        settings = SamplingSettings(sampler=name, steps=int(steps), cfg_scale=float(cfg[0]) if cfg else args.cfg)
        sampler = build_sampler(objective, settings)

        def call(_call: int) -> None:
            for _ in generate(net, sampler, spec, vae=vae, device=device):
                pass

        return call, sampler.model_calls

    def theirs(_call: int) -> None:
        pipe(
            class_labels=labels.tolist(),
            guidance_scale=args.cfg,
            num_inference_steps=peer_steps,
            output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        )

    rows = []
    with torch.no_grad():  # one warm-up call each, then the median of --repeats
        for text in ours_specs:
            call, calls = ours(text)
            rows.append((f"dit {text}", calls, median_time(call, args.repeats, warmup=1, device=device)))
        t_theirs = median_time(theirs, args.repeats, warmup=1, device=device)
    header(device)
    print(
        f"{args.model} latent {args.input_size}x{args.input_size}x4, VAE x{args.vae_downsample}, batch {args.batch}; "
        f"DiTPipeline: {peer_steps} "
        f"DDPM steps, cfg {args.cfg} ({2 * peer_steps if args.cfg != 1 else peer_steps} model calls an image)"
    )
    print(
        f"| sampler | model calls an image | s / batch (median of {args.repeats}) | images/s "
        "| speed-up vs DiTPipeline |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, calls, t in rows:
        print(f"| {name} | {calls} | {t:.2f} | {args.batch / t:.3f} | {t_theirs / t:.2f}x |")
    print(f"| diffusers DiTPipeline | {2 * peer_steps if args.cfg != 1 else peer_steps} | {t_theirs:.2f} | "
          f"{args.batch / t_theirs:.3f} | 1 |")  # fmt: skip
    print(f"speed-up (ours / diffusers): {t_theirs / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
