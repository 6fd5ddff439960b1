"""Fused LayerNorm + modulate: time, GB/s and % of copy bandwidth vs eager PyTorch and torch.compile.

One call on a GPU runs everything:  make bench-kernel   (python benchmarks/bench_kernel.py)

For the hidden sizes of DiT-S/B/L/XL at batch 32 x 256 tokens, bf16: forward and forward+backward,
median of many runs over rotating input sets (so L2 does not hold them), achieved GB/s against the
fewest bytes the op must move, as % of a device-to-device copy measured in the same run. Then the
effect on a whole DiT-XL/2 training step and on a sampling forward (fused_adaln true vs false).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dit.ops import layernorm_modulate_fused, layernorm_modulate_reference

SIZES = {"DiT-S": 384, "DiT-B": 768, "DiT-L": 1024, "DiT-XL": 1152}


def bench(fn, n_sets: int, reps: int = 50) -> float:
    """Median ms of fn(i) over reps runs, cycling over n_sets input sets, timed with CUDA events."""
    for i in range(3):
        fn(i % n_sets)
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % n_sets)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), 1, reps=30)
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
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
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
        e = 2  # bytes per bf16 element
        bytes_fwd = (2 * B * T * D + 2 * B * D) * e  # read x, shift, scale; write y
        bytes_fb = bytes_fwd + (3 * B * T * D + 3 * B * D) * e  # + read dy, x; write dx, dshift, dscale
        results = {}
        for name, fn in impls.items():
            fwd = bench(lambda i, fn=fn, sets=sets: fn(*sets[i][:3]), args.sets)
            fb = bench(lambda i, fn=fn, sets=sets: torch.autograd.grad(fn(*sets[i][:3]), sets[i][:3], sets[i][3]), args.sets)
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

    from dit.diffusion import create_diffusion
    from dit.models import create_model

    print("\n| DiT-XL/2, bf16 autocast | fused_adaln=false ms | true ms | speed-up |")
    print("|---|---:|---:|---:|")
    model = create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = create_diffusion()
    x, y = torch.randn(32, 4, 32, 32, device=dev), torch.randint(1000, (32,), device=dev)
    t = torch.randint(1000, (32,), device=dev)

    def train_step(_):
        with torch.autocast("cuda", dtype=dt):
            loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
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
