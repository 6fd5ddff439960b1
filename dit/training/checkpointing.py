"""Training checkpoints: run_dir/checkpoints/step_0001000/, written atomically, the last K kept.

A checkpoint directory holds Accelerate's state (model.safetensors, optimizer.bin, random_states_*,
scaler), ema.safetensors, config.json (so sample.py loads it directly, EMA weights by default) and
trainer_state.json (step and data position), written last. It is assembled in a hidden temporary
directory and renamed into place, so a crash leaves the previous checkpoints untouched and no
half-written directory under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dit.checkpoints import export_config
from dit.models.state_dict import load_state_dict_checked

STATE_FILE = "trainer_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """resume=None: start fresh; "auto": the latest complete checkpoint of run_dir, if any; else a path
    to a checkpoint directory or to a run directory (its latest checkpoint)."""
    if resume in (None, "", "none", False):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"resume={resume}: no complete checkpoint there (expected {path}/{STATE_FILE} or {path}/checkpoints/step_*)"
        )
    return found[-1]


def all_processes(accelerator, flag: bool | torch.Tensor) -> bool:
    """True when `flag` holds on every process (accelerate's reduce knows only sum and mean)."""
    ok = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(())
    return bool(accelerator.reduce(ok, "sum").item() == accelerator.num_processes)


def _all_finite(accelerator, model: torch.nn.Module) -> bool:
    """Every process checks its own parameters (its shards under FSDP)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return all_processes(accelerator, all(bool(torch.isfinite(p).all()) for p in local))


def save_checkpoint(
    accelerator, model, ema, run_dir: Path, step: int, trainer_state: dict, data_meta: dict, keep_last: int, objective: dict | None = None
) -> Path:
    """Collective: every rank calls it. Refuses (ValueError) to save non-finite weights.
    objective: the objective's settings, saved in config.json beside the architecture."""
    ema.sync()
    unwrapped = accelerator.unwrap_model(model)
    if not _all_finite(accelerator, unwrapped) or not all(torch.isfinite(p).all() for p in ema.model.parameters()):
        raise ValueError(f"step {step}: the weights contain NaN/Inf; not saving a checkpoint")
    final = checkpoint_root(run_dir) / f"step_{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.model.state_dict().items()}, tmp / "ema.safetensors")
        (tmp / "config.json").write_text(json.dumps(export_config(unwrapped, objective, data_meta), indent=1))
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))  # last: marks it complete
        if final.exists():  # the same step saved again (e.g. the final save): replace it whole
            old = final.with_name(f".{final.name}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, ema, path: Path, objective: dict | None = None) -> dict:
    """Restore model, optimiser, RNG states and EMA in place; returns the trainer state.

    The architecture (model.config) and the objective's settings must match the checkpoint's;
    runtime choices (fused kernel, compile, gradient checkpointing) are not part of either and may
    change between runs."""
    meta = json.loads((path / "config.json").read_text())
    own = accelerator.unwrap_model(model).config
    diff = {k: (meta["model"].get(k), v) for k, v in own.items() if meta["model"].get(k) != v}
    saved_objective = meta.get("objective") or {}
    if objective is not None and saved_objective and saved_objective != objective:
        keys = sorted(set(saved_objective) | set(objective))
        diff.update({f"objective.{k}": (saved_objective.get(k), objective.get(k)) for k in keys if saved_objective.get(k) != objective.get(k)})
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: it differs from the config ({listing})")
    accelerator.load_state(str(path))
    load_state_dict_checked(ema.model, load_file(path / "ema.safetensors"), path / "ema.safetensors")
    state = json.loads((path / STATE_FILE).read_text())
    ema.num_updates = state.get("ema_num_updates", state["step"])
    return state
