"""The model zoo as data: depth / width / heads per size (DiT paper, Table 1) times patch sizes 2, 4, 8.

S, B, L, XL are the paper's. Ti and Debug are ours, small enough for a 2-core CPU: Ti trains
Fashion-MNIST in minutes (``make train``), Debug keeps unit tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DiTSize", "SIZES", "PATCH_SIZES", "DIT_MODELS", "model_config", "config_name", "zoo_size"]


@dataclass(frozen=True)
class DiTSize:
    depth: int  # number of DiT blocks N
    hidden_size: int  # token width d
    num_heads: int  # attention heads; head width = hidden_size / num_heads


#                   depth  hidden  heads
SIZES: dict[str, DiTSize] = {
    "Debug": DiTSize(2, 64, 2),
    "Ti": DiTSize(6, 256, 4),
    "S": DiTSize(12, 384, 6),
    "B": DiTSize(12, 768, 12),
    "L": DiTSize(24, 1024, 16),
    "XL": DiTSize(28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)

# "DiT-XL/2" -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
DIT_MODELS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(depth=s.depth, hidden_size=s.hidden_size, num_heads=s.num_heads, patch_size=p)
    for size, s in SIZES.items()
    for p in PATCH_SIZES
}


def model_config(name: str) -> dict[str, int]:
    """Architecture of a zoo entry; a clear error listing the valid names otherwise."""
    try:
        return dict(DIT_MODELS[name])
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(DIT_MODELS)}") from None


def zoo_size(size: str) -> dict[str, int]:
    """A size by its short name, "XL/2" (what ``model.size`` takes) -> depth, hidden_size, num_heads, patch_size."""
    try:
        return dict(DIT_MODELS[f"DiT-{size}"])
    except KeyError:
        valid = ", ".join(n.removeprefix("DiT-") for n in DIT_MODELS)
        raise ValueError(f"unknown model size {size!r}; valid sizes: {valid}") from None


def config_name(name: str) -> str:
    """Hydra config file of a zoo entry: "DiT-XL/2" -> "dit_xl2"."""
    return name.replace("DiT-", "dit_").replace("/", "").lower()
