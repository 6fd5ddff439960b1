"""Inception-v3 features for FID: torch-fidelity's TF-compatible network with the 2015-12-05 weights.

The weights are never downloaded here: they come from the torch hub cache (where torch and torch-fidelity keep
them: torch.hub.get_dir(), which follows $TORCH_HOME, $XDG_CACHE_HOME and ~) or an explicit path, and a missing
file is a clear error saying what to get and where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit.integrity import sha256_of

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SIZE = 95_628_359
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
EXTRACTOR = "inception-v3-compat/2015-12-05/pool3-2048"


def hub_checkpoints_dir() -> Path:
    """Where torch.hub (and torch-fidelity through it) keeps downloaded weights: <torch.hub.get_dir()>/checkpoints,
    i.e. $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub (~ expanded in each)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file: an explicit path, else <WEIGHTS_NAME> in hub_checkpoints_dir()."""
    hub = hub_checkpoints_dir()
    candidate = Path(path) if path else hub / WEIGHTS_NAME
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"Inception weights not found at {candidate}. FID needs {WEIGHTS_NAME} ({WEIGHTS_SIZE:,} bytes, "
        f"SHA256 {WEIGHTS_SHA256}), the torch-fidelity / pytorch-fid release of the TF 2015-12-05 FID Inception. "
        f"Put it in {hub}/ (torch's hub cache: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else "
        "~/.cache/torch/hub) or pass its path (eval.inception_weights=<path> or --inception-weights); "
        "nothing is downloaded at run time."
    )


class InceptionFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) images -> (pool3 features (N, 2048), logits (N, 1008)), any H, W."""

    name = EXTRACTOR
    dims = 2048

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        # torch-fidelity takes seconds to import; only an Inception extractor needs it
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_weights(weights)
        try:  # torch-fidelity unpickles with weights_only=False: only hand it files that need no code
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path}: not a plain state dict of tensors ({type(e).__name__}); refusing to unpickle it"
            ) from None
        self.official = path.stat().st_size == WEIGHTS_SIZE and sha256_of(path) == WEIGHTS_SHA256
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        return pool.double(), logits.double()
