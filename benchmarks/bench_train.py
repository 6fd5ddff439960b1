"""Training throughput: our train() loop against a plain diffusers loop, same size, batch, precision.

Ours is the real loop (dit.training.train: hybrid loss with the VB term, EMA every step, logging)
on synthetic latents held in memory; the peer is the loop people write around diffusers:
DiTTransformer2DModel + DDPMScheduler.add_noise + epsilon MSE + AdamW. Both log the loss every step.
--objectives times our loop with other objectives too (name[:setting=value,...]), each against the first: what a
training step of MeanFlow (its JVP) or a shortcut model costs against flow matching's, e.g.
    python benchmarks/bench_train.py --objectives flow meanflow meanflow:omega=2 shortcut

    python benchmarks/bench_train.py                                     # CPU: small model
    python benchmarks/bench_train.py --model DiT-XL/2 --batch 256 --precision bf16 --device cuda \\
        --variants eager,compile,ckpt,compile+ckpt --peak-tflops 989       # H100 SXM bf16 dense
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml
from common import header, median, median_time, setup_tf32
from diffusers import DDPMScheduler, DiTTransformer2DModel

from dit.diffusion import SamplingSettings, build_objective
from dit.models import create_model, model_config
from dit.training import OptimConfig, TrainConfig, TrainingJob, train
from dit.zoo import count


class SyntheticLatents(torch.utils.data.Dataset):
    """Random latents and labels in memory: measures the loop, not the disk."""

    latent, class_names = False, None

    def __init__(self, n: int, channels: int, size: int, num_classes: int = 1000):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, channels, size, size, generator=g)
        self.y = torch.randint(num_classes, (n,), generator=g)
        self.channels, self.input_size, self.num_classes = channels, size, num_classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def batch_transform(self, x, rng):
        return x


def parse_objective(spec: str):
    """name[:setting=value,...] -> the objective."""
    name, _, rest = spec.partition(":")
    settings = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return build_objective(name, **{k: yaml.safe_load(v) for k, v in settings.items()})


def ours(args, variant: str, objective_spec: str = "ddpm") -> dict:
    objective = parse_objective(objective_spec)
    inputs = dict(interval_input=objective.interval_input, guidance_input=objective.guidance_input)
    model = create_model(args.model, input_size=args.input_size, in_channels=4, num_classes=1000, **inputs)
    data = SyntheticLatents(args.batch * 4, 4, args.input_size)
    total = args.warmup + args.steps
    t = TrainConfig(
        total_steps=total,
        global_batch_size=args.batch,
        mixed_precision=args.precision,
        log_every=1,
        ckpt_every=0,
        sample_every=0,  # one grid at the end, as small as possible
        grid_sampling=SamplingSettings(steps=2),
        sample_per_class=1,
        sample_max_classes=1,
        num_workers=0,
        compile="compile" in variant,
        gradient_checkpointing="ckpt" in variant,
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        train(TrainingJob(model, data, objective, run_dir, t, OptimConfig(), seed=0))
        recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    per_step = [1 / r["steps_per_s"] for r in recs[args.warmup :]]
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return {"s_per_step": median(per_step), "peak_gib": peak}


def peer(args) -> dict:
    device = torch.device(args.device)
    cfg = model_config(args.model)  # the same size
    model = (
        DiTTransformer2DModel(
            num_attention_heads=cfg["num_heads"],
            attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
            in_channels=4,
            out_channels=8,
            num_layers=cfg["depth"],
            sample_size=args.input_size,
            patch_size=cfg["patch_size"],
            num_embeds_ada_norm=1000,
        )
        .to(device)
        .train()
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    data = SyntheticLatents(args.batch * 4, 4, args.input_size)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(n: int) -> None:
        i = (n % 4) * args.batch
        x, y = data.x[i : i + args.batch].to(device), data.y[i : i + args.batch].to(device)
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),), device=device)
        noisy = scheduler.add_noise(x, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(noisy, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(out[:, :4].float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # logged every step, like ours

    s_per_step = median_time(step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"s_per_step": s_per_step, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/4")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--variants", default="eager", help="comma list of eager, compile, ckpt, compile+ckpt (ours)")
    p.add_argument("--objectives", nargs="+", default=["ddpm"], help="ours: name[:setting=value,...] (each variant)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100 SXM bf16: 989)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    setup_tf32(args.device)
    train_flops = 3 * 2 * count(args.model, "adaln_zero", input_size=args.input_size)["gflops"] * 1e9  # per image

    rows = [
        (f"dit ({v})" if args.objectives == ["ddpm"] else f"dit {o} ({v})", ours(args, v, o))
        for o in args.objectives
        for v in args.variants.split(",")
    ]
    rows.append(("diffusers plain loop (eager)", peer(args)))
    print()
    header(args.device)
    print(
        f"{args.model}, {args.input_size}x{args.input_size}x4 latents, batch {args.batch}, precision {args.precision}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print("| loop | s / step | steps/s | images/s | MFU | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        ips = args.batch / r["s_per_step"]
        mfu = f"{100 * ips * train_flops / (args.peak_tflops * 1e12):.1f}%" if args.peak_tflops else "-"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {name} | {r['s_per_step']:.3f} | {1 / r['s_per_step']:.2f} | {ips:.1f} | {mfu} | {mem} |")
    print(
        f"ratio ours (first variant) / diffusers, images/s: {rows[-1][1]['s_per_step'] / rows[0][1]['s_per_step']:.2f}x"
    )
    for name, r in rows[1:-1]:
        print(f"time a step, {name} / {rows[0][0]}: {r['s_per_step'] / rows[0][1]['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
