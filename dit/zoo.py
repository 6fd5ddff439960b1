"""Print the model zoo: parameters, GFLOPs and tokens of every size x conditioning block.

    python -m dit.zoo                 # table, 256x256 images = 32x32x4 latents
    python -m dit.zoo --json          # the same as a JSON list
    python -m dit.zoo --markdown      # a Markdown table (docs/zoo.md)
    python -m dit.zoo --model DiT-XL/2 --block adaln_zero spade   # some rows only

GFLOPs are counted as the DiT paper counts them: multiply-adds of one forward pass of one image,
i.e. torch.utils.flop_counter's FLOPs / 2 (dit/models/flops.py: models are built on the meta device, no
weights are allocated, so even DiT-XL/2 is counted in about a second).
"""

from __future__ import annotations

import argparse
import json

from dit.models import BLOCKS, DIT_MODELS, DiTConfig, model_config
from dit.models.flops import count_config
from dit.models.routing import TokenRouting

# Published Gflops (DiT paper): Figure 5 for the four conditioning variants of XL/2, Table 1 for the p=4
# column, Table 4 for the other adaLN-Zero entries. Shown beside our counts in --markdown.
PAPER_GFLOPS = {
    ("DiT-XL/2", "in_context"): 119.4, ("DiT-XL/2", "cross_attn"): 137.6,
    ("DiT-XL/2", "adaln"): 118.6, ("DiT-XL/2", "adaln_zero"): 118.6,
    ("DiT-S/4", "adaln_zero"): 1.4, ("DiT-B/4", "adaln_zero"): 5.6,
    ("DiT-L/4", "adaln_zero"): 19.7, ("DiT-XL/4", "adaln_zero"): 29.1,
    ("DiT-S/2", "adaln_zero"): 6.06, ("DiT-S/8", "adaln_zero"): 0.36,
    ("DiT-B/2", "adaln_zero"): 23.01, ("DiT-B/8", "adaln_zero"): 1.42,
}  # fmt: skip
# Parameters (M): DiT paper (675M); DiffiT abstract: latent DiffiT (DiT-XL/2-sized: depth 28, width
# 1152, patch 2) has 16.88% fewer than DiT-XL/2, i.e. 561M. PixArt-alpha's 611M (adaLN-single, from
# 833M with adaLN) includes text cross-attention: not the same model, compared in docs/zoo.md.
PAPER_PARAMS_M = {("DiT-XL/2", "adaln_zero"): 675, ("DiT-XL/2", "diffit"): 561}


def count(
    name: str,
    block: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    routing: TokenRouting | None = None,
) -> dict:
    """Trainable parameters, forward GFLOPs (multiply-adds) and tokens of one zoo entry; with ``routing``
    (TREAD), the GFLOPs of a training forward with that share of the tokens routed past its blocks. A block that
    reads a spatial map (spade) is counted with its one-channel 8x8 map (Block.needs)."""
    data = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    config = DiTConfig(**model_config(name), **data, name=name, block=block, **BLOCKS[block].needs)
    return count_config(config, routing) | {"model": name, "block": block}


def zoo_table(input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, models=None, blocks=None) -> list:
    """count() for every size x block (or those of ``models`` x ``blocks``), in registry order."""
    models, blocks = (
        [n for n in DIT_MODELS if n in (models or DIT_MODELS)],
        [b for b in BLOCKS if b in (blocks or BLOCKS)],
    )
    return [count(n, b, input_size, in_channels, num_classes) for n in models for b in blocks]


def _gflops(g: float) -> str:
    """Two decimals as in the paper, three significant digits for the tiny CPU sizes."""
    return f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit.zoo", description=__doc__.split("\n\n")[0])
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of {model, block, params, gflops, tokens}")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--input-size", type=int, default=32, help="latent (or pixel) side length [32 = 256x256 images]"
    )
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--model", nargs="+", choices=list(DIT_MODELS), help="these sizes only (default: all)")
    parser.add_argument("--block", nargs="+", choices=list(BLOCKS), help="these blocks only (default: all)")
    args = parser.parse_args(argv)
    rows = zoo_table(args.input_size, args.in_channels, args.num_classes, args.model, args.block)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    header = ("model", "block", "params (M)", "GFLOPs", "tokens")
    lines = [(r["model"], r["block"], f"{r['params'] / 1e6:.2f}", _gflops(r["gflops"]), str(r["tokens"])) for r in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " | paper GFLOPs | paper params (M) |")
        print("|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|")
        for r, line in zip(rows, lines):
            key = (r["model"], r["block"])
            paper = (str(PAPER_GFLOPS.get(key, "")), str(PAPER_PARAMS_M.get(key, "")))
            print("| " + " | ".join(line + paper) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for line in lines:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))


if __name__ == "__main__":
    main()
