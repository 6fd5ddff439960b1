"""Fused LayerNorm + modulate: time, GB/s and % of copy bandwidth vs eager PyTorch and torch.compile.

One call on a GPU runs everything:  make bench-kernel   (python benchmarks/bench_kernel.py)

For the hidden sizes of DiT-S/B/L/XL at batch 32 x 256 tokens, bf16: forward and forward+backward,
median of many runs over rotating input sets (so L2 does not hold them), achieved GB/s against the
fewest bytes the op must move, as % of a device-to-device copy measured in the same run. Then the
effect on a whole DiT-XL/2 training step and on a sampling forward (fused_adaln true vs false).
"""

from __future__ import annotations

import argparse

import torch
from common import header, median_time, setup_tf32

from dit.ops import layernorm_modulate_fused, layernorm_modulate_reference

SIZES = {"DiT-S": 384, "DiT-B": 768, "DiT-L": 1024, "DiT-XL": 1152}


def bench(fn, n_sets: int, reps: int = 50, device: str = "cuda") -> float:
    """Median ms of fn(i) over reps runs after 3 warm-up runs, cycling over n_sets input sets
    (timed with CUDA events on a GPU; see common.time_calls)."""
    return 1e3 * median_time(lambda i: fn(i % n_sets), reps, warmup=3, device=device)


def op_bytes(B: int, T: int, D: int, elem_bytes: int = 2) -> tuple[int, int]:
    """Fewest bytes LayerNorm + modulate must move for x (B, T, D), shift and scale (B, D):
    forward, and forward + backward."""
    fwd = (2 * B * T * D + 2 * B * D) * elem_bytes  # read x, shift, scale; write y
    fwd_bwd = fwd + (3 * B * T * D + 3 * B * D) * elem_bytes  # + read dy, x; write dx, dshift, dscale
    return fwd, fwd_bwd


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 28) -> float:
    """GB/s of a large device-to-device copy (bytes read + written); 256 MiB by default."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), 1, reps=30, device=device)
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--sets", type=int, default=8, help="rotating input sets (8 x 18 MiB > 50 MiB L2)")
    p.add_argument("--skip-model", action="store_true", help="only the op, not the DiT-XL/2 step")
    args = p.parse_args()
    assert torch.cuda.is_available(), "bench-kernel needs a CUDA GPU"
    dev, dt = "cuda", torch.bfloat16
    header(dev)
    setup_tf32(dev)  # as the other benchmarks and the training loop (the op itself runs in bf16)
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s\n")
    eager = layernorm_modulate_reference
    compiled = torch.compile(layernorm_modulate_reference)
    impls = {"fused (ours)": layernorm_modulate_fused, "eager": eager, "torch.compile": compiled}
    print("| size | D | pass | impl | ms | GB/s | % copy | vs eager | vs compile |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for size, D in SIZES.items():
        B, T = args.batch, args.tokens
        sets = []
        for _ in range(args.sets):
            x = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)
            shift = torch.randn(B, D, device=dev, dtype=dt, requires_grad=True)
            scale = (0.1 * torch.randn(B, D, device=dev, dtype=dt)).requires_grad_()
            sets.append((x, shift, scale, torch.randn(B, T, D, device=dev, dtype=dt)))
        bytes_fwd, bytes_fb = op_bytes(B, T, D, elem_bytes=2)  # bf16
        results = {}
        for name, fn in impls.items():
            fwd = bench(lambda i, fn=fn, sets=sets: fn(*sets[i][:3]), args.sets)
            fb = bench(
                lambda i, fn=fn, sets=sets: torch.autograd.grad(fn(*sets[i][:3]), sets[i][:3], sets[i][3]), args.sets
            )
            results[name] = (fwd, fb)
        for k, (label, nbytes) in enumerate((("fwd", bytes_fwd), ("fwd+bwd", bytes_fb))):
            for name, times in results.items():
                ms = times[k]
                gbs = nbytes / ms / 1e6
                print(
                    f"| {size} | {D} | {label} | {name} | {ms:.4f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
                    f"{results['eager'][k] / ms:.2f}x | {results['torch.compile'][k] / ms:.2f}x |"
                )
    if args.skip_model:
        return

    from dit.diffusion import build_objective
    from dit.models import create_model
    from dit.training.randomness import SlicedRandom

    print("\n| DiT-XL/2, bf16 autocast | fused_adaln=false ms | true ms | speed-up |")
    print("|---|---:|---:|---:|")
    model = create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = build_objective()  # DiT's DDPM objective (hybrid loss)
    x, y = torch.randn(32, 4, 32, 32, device=dev), torch.randint(1000, (32,), device=dev)
    draw = objective.draw(SlicedRandom(0, 0, 0, 1, 0, torch.device(dev)), x)  # timesteps and noise, fixed across reps
    t = draw["t"]

    def train_step(_):
        with torch.autocast("cuda", dtype=dt):
            loss = objective.losses(model, x, draw, {"y": y})["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_forward(_):
        with torch.no_grad(), torch.autocast("cuda", dtype=dt):
            model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))

    for label, fn in (("training step, batch 32", train_step), ("sampling forward, batch 2x32 (cfg)", sample_forward)):
        ms = {}
        for mode in ("false", "true"):
            model.set_fused_adaln(mode)
            ms[mode] = bench(fn, 1, reps=20)
        print(f"| {label} | {ms['false']:.2f} | {ms['true']:.2f} | {ms['false'] / ms['true']:.3f}x |")


if __name__ == "__main__":
    main()
