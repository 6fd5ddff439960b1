"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
section 3 and appendix C): choose the EMA length after training.

During training two (or more) power-function EMA profiles are tracked (dit.training.ema.PowerProfile) and
snapshots of them are saved every few steps (run_dir/phema/step_XXXXXXX.safetensors). A power-function profile
of exponent gamma averages the weights seen up to time t with density p(tau) = (gamma + 1) / t * (tau / t)^gamma; its
width relative to t is sigma_rel (Eq. 123). Any other profile (sigma_rel, t) is then approximated, as a least-squares
combination of the snapshots' profiles (Algorithm 3): the coefficients solve A x = b with A the inner products of
the snapshot profiles with each other and b their inner products with the target (Eq. 151, in closed form).

Time is counted in EMA updates (optimiser steps): the tracking rule beta_n = (1 - 1/n)^(gamma + 1) (Eq. 127 with a
constant batch, t = n batches) and the reconstruction use the same clock, and a common scale of time cancels in
the solve. Checked against NVlabs/edm2's training/phema.py (tests/data/edm2_phema_reference.json) to 1e-10.

    python -m dit.phema outputs/<run> --sigma-rel 0.05 0.10 0.15 --step 2000   # exports, one per width
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit.atomic import atomic_file
from dit.integrity import DamagedFileError, safetensors_problem

__all__ = [
    "SNAPSHOT_DIR",
    "Snapshot",
    "find_snapshots",
    "gamma_to_sigma_rel",
    "power_beta",
    "power_inner_product",
    "reconstruct",
    "save_snapshot",
    "sigma_rel_to_gamma",
    "solve_coefficients",
]

SNAPSHOT_DIR = "phema"  # run_dir/phema/step_XXXXXXX.safetensors
SIGMA_REL_MAX = 0.2886  # sigma_rel(gamma -> 0) = sqrt(1/12): the widest profile (a plain average from time 0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """A profile's relative width from its exponent (Eq. 123)."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the profile of relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (Eq. 126, Algorithm 2)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel}: need 0 < sigma_rel < {SIGMA_REL_MAX} (wider needs gamma < 0)")
    s = np.float64(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def power_beta(gamma: float, n: int) -> float:
    """The decay of update n (n = 1, 2, ...) that tracks the power-function profile of exponent gamma:
    (1 - 1/n)^(gamma + 1) (Eq. 127 with t_next = n, t_delta = 1); update 1 copies the weights."""
    return (1.0 - 1.0 / n) ** (gamma + 1.0)


def power_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b>: the integral over time of the product of two power-function profiles ending at t_a and t_b
    (Eq. 151): (ga + 1)(gb + 1) (t_min / t_max)^g / ((ga + gb + 1) t_max), where g is the exponent of the profile
    that ends later. Broadcasts."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_max, t_min = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    later = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_min / t_max) ** later / ((gamma_a + gamma_b + 1) * t_max)


def solve_coefficients(in_t, in_sigma, out_t, out_sigma) -> np.ndarray:
    """[inputs, outputs]: the weights of each input snapshot (time in_t[i], width in_sigma[i]) in the least-squares
    reconstruction of each output profile (out_t[j], out_sigma[j]), normalised to sum to 1 (Algorithm 3)."""
    in_t, in_sigma = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(in_t, in_sigma))
    out_t, out_sigma = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(out_t, out_sigma))
    in_g = np.array([sigma_rel_to_gamma(s) for s in in_sigma])
    out_g = np.array([sigma_rel_to_gamma(s) for s in out_sigma])
    A = power_inner_product(in_t[:, None], in_g[:, None], in_t[None, :], in_g[None, :])
    B = power_inner_product(in_t[:, None], in_g[:, None], out_t[None, :], out_g[None, :])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


# --- snapshots -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One profile's weights saved at a training step: its file, the step, the EMA updates so far (its time) and
    the profile's width."""

    path: Path
    step: int
    updates: int
    sigma_rel: float

    @property
    def prefix(self) -> str:
        return key_prefix(self.sigma_rel)

    def state_dict(self) -> dict[str, torch.Tensor]:
        with safe_open(self.path, "pt") as f:
            return {k[len(self.prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(self.prefix)}


def key_prefix(sigma_rel: float) -> str:
    return f"sigma_rel={sigma_rel:.4f}/"


def save_snapshot(run_dir: Path, step: int, updates: int, profiles: dict[float, dict[str, torch.Tensor]]) -> Path:
    """run_dir/phema/step_XXXXXXX.safetensors: every profile's state dict (keys '<sigma_rel>/<name>'), with the step,
    the updates and the widths in its metadata; written atomically."""
    tensors = {
        key_prefix(s) + k: v.detach().float().contiguous().cpu() for s, sd in profiles.items() for k, v in sd.items()
    }
    meta = {"step": str(step), "updates": str(updates), "sigma_rels": json.dumps(sorted(profiles))}
    path = Path(run_dir) / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"
    return atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta), suffix=".safetensors")


def find_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every (snapshot file, profile) of a run, by step then width; a damaged file is one line naming it."""
    found = []
    for path in sorted((Path(run_dir) / SNAPSHOT_DIR).glob("step_*.safetensors")):
        if not re.fullmatch(r"step_\d{7}\.safetensors", path.name):
            continue
        if problem := safetensors_problem(path):
            raise DamagedFileError(path, problem)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        try:
            step, updates, widths = int(meta["step"]), int(meta["updates"]), json.loads(meta["sigma_rels"])
        except (KeyError, ValueError) as e:
            raise DamagedFileError(path, f"no post-hoc EMA metadata ({e})") from None
        found += [Snapshot(path, step, updates, float(s)) for s in widths]
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rels: Iterable[float], step: int | None = None
) -> tuple[dict[float, dict[str, torch.Tensor]], np.ndarray, list[Snapshot]]:
    """The EMA weights of each profile of width sigma_rels at `step` (default: the last snapshot's), from the
    snapshots saved up to it: ({sigma_rel: state dict}, the coefficients [snapshot, width], the snapshots used).
    Floating tensors are combined in float64 and returned in float32; others are the last snapshot's."""
    sigma_rels = [float(s) for s in sigma_rels]
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots (train with training.phema_sigma_rels and phema_snapshot_every)")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"step {step}: no snapshot there; snapshots at steps {', '.join(map(str, steps))}")
    used = [s for s in snapshots if s.step <= step and s.updates > 0]
    out_t = next(s.updates for s in used if s.step == step)
    coefficients = solve_coefficients([s.updates for s in used], [s.sigma_rel for s in used], out_t, sigma_rels)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for i, snap in enumerate(used):  # one snapshot in memory at a time
        for name, tensor in snap.state_dict().items():
            for j, acc in enumerate(sums):
                if not tensor.is_floating_point():
                    acc[name] = tensor
                elif name in acc:
                    acc[name] += float(coefficients[i, j]) * tensor.double()
                else:
                    acc[name] = float(coefficients[i, j]) * tensor.double()
    weights = {
        s: {k: v.float() if v.is_floating_point() else v for k, v in acc.items()} for s, acc in zip(sigma_rels, sums)
    }
    return weights, coefficients, used
