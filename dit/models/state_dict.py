"""Strict state-dict loading with errors that name the file and every mismatched key or shape."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_state_dict_checked"]


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """load_state_dict(strict=True), with an error that names the file and every mismatched key/shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"checkpoint {source} does not fit the model config:"]
        if shapes:
            lines.append(f"  shape mismatches: {show(shapes)}")
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
