"""Training checkpoints: run_dir/checkpoints/step_0001000/, written atomically and durably, the last K kept.

A checkpoint directory holds Accelerate's state (model.safetensors, optimizer.bin, random_states_*,
scaler), ema.safetensors, config.json (so sample.py loads it directly, EMA weights by default) and
trainer_state.json (step, data position and the size of every other file), written last. It is
assembled in a hidden temporary directory, fsynced, renamed into place and the parent directory
fsynced, so a crash or power loss leaves the previous checkpoints untouched and no half-written
directory under a real name. Before a save the free space is checked against the last checkpoint's size
(training.low_disk: warn, or stop cleanly before writing); a save that fails (disk full, quota, file-size limit)
removes its temporary directory and says so in one line (dit.atomic.WriteFailed); temporaries of saves that were
killed are removed when a run starts (dit.atomic.remove_stale_temporaries) and after each save.

Resuming checks a checkpoint before loading it (every file present with its saved size, headers of
safetensors / zip / JSON files readable): resume=auto skips a damaged one with a warning and takes
the newest one that is whole; damaged checkpoints are never deleted, nor counted by keep_last.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.atomic import WriteFailed, free_bytes, fsync_dir, fsync_tree, human_bytes, replace_dir, write_failure
from dit.hub import objective_settings
from dit.integrity import DamagedFileError, header_problem, load_safetensors, load_state_dict_checked, read_json
from dit.models.config import DiTConfig
from dit.training.ema import POWER_FILE

STATE_FILE = "trainer_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and are skipped).
    Complete means renamed into place with its trainer_state.json; whether its files are whole is
    checkpoint_problem's question."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at path cannot be resumed from (None: it looks whole). Reads sizes and headers,
    not every byte: finds missing, empty, truncated and foreign files."""
    path = Path(path)
    try:
        state = read_json(path / STATE_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{path / STATE_FILE} has no step"
        for name, size in (state.get("files") or {}).items():  # checkpoints written before the manifest lack it
            if not (path / name).is_file():
                return f"{path / name} is missing"
            if (path / name).stat().st_size != size:
                return f"{path / name} is damaged: {(path / name).stat().st_size} bytes, {size} when it was saved"
        for required in ("config.json", "ema.safetensors"):
            if not (path / required).is_file():
                return f"{path / required} is missing"
        for file in sorted(path.rglob("*")):
            if problem := header_problem(file):
                return f"{file} is damaged: {problem}"
    except (DamagedFileError, FileNotFoundError) as e:
        return str(e)
    return None


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _latest_intact(found: list[Path], where: Path) -> Path:
    """The newest checkpoint of `found` that is whole; warns about each newer damaged one (left in place)."""
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems and _is_main_process():
                skipped = "; ".join(f"{p.name}: {why}" for p, why in problems)
                warnings.warn(
                    f"resume: skipping damaged checkpoint(s) ({skipped}); resuming from {path} (nothing deleted)",
                    stacklevel=3,
                )
            return path
        problems.append((path, problem))
    listing = "; ".join(f"{p.name}: {why}" for p, why in problems)
    raise ValueError(f"no usable checkpoint in {checkpoint_root(where)}: every one is damaged ({listing})")


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """resume=None: start fresh; "auto": the latest whole checkpoint of run_dir, if any (damaged newer ones
    are skipped with a warning); else a path to a checkpoint directory or to a run directory (its latest
    whole checkpoint)."""
    if resume in (None, "", "none", False):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return _latest_intact(found, Path(run_dir)) if found else None
    path = Path(resume)
    if (path / STATE_FILE).exists():
        if problem := checkpoint_problem(path):
            raise ValueError(f"cannot resume from {path}: {problem}")
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"resume={resume}: no complete checkpoint there (expected {path}/{STATE_FILE} or {path}/checkpoints/step_*)"
        )
    return _latest_intact(found, path)


def all_processes(accelerator, flag: bool | torch.Tensor) -> bool:
    """True when `flag` holds on every process (accelerate's reduce knows only sum and mean)."""
    ok = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(())
    return bool(accelerator.reduce(ok, "sum").item() == accelerator.num_processes)


def main_process_says(accelerator, flag: bool) -> bool:
    """The main process's `flag`, on every process (what it alone can see, e.g. a file only it writes)."""
    ok = torch.as_tensor(
        flag if accelerator.is_main_process else False, dtype=torch.float32, device=accelerator.device
    ).reshape(())
    return bool(accelerator.reduce(ok, "sum").item() > 0)


def _all_finite(accelerator, model: torch.nn.Module) -> bool:
    """Every process checks its own parameters (its shards under FSDP)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return all_processes(accelerator, all(bool(torch.isfinite(p).all()) for p in local))


@dataclass
class CheckpointState:
    """What a checkpoint records beside Accelerate's state: the step, the trainer's position (trainer_state.json:
    data position, EMA updates, training seconds, pending work, rollbacks) and config.json's contents (the DiT's
    architecture, objective, data and init_from: dit.hub.export_config)."""

    step: int
    position: dict
    config: dict


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint directory's files."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


KEPT = "the earlier checkpoints are untouched"


def _check_space(accelerator, run_dir: Path, final: Path, low_disk: str) -> int | None:
    """Collective. The bytes the save will need (the last checkpoint's size; None before the first), after warning
    about (low_disk=warn) or stopping before (low_disk=stop: WriteFailed on every process) a save the free space
    cannot hold. The main process, which writes the shared files, decides."""
    found = [p for p in list_checkpoints(run_dir) if p != final]
    needed = checkpoint_bytes(found[-1]) if found and accelerator.is_main_process else None
    free = free_bytes(final) if needed else None
    short = needed is not None and free is not None and free < needed
    if short and low_disk == "warn":
        warnings.warn(
            f"low disk space: checkpoint {final} needs about {human_bytes(needed)} (the size of {found[-1].name}), "
            f"{human_bytes(free)} free; writing it may fail (training.low_disk=stop stops cleanly instead)",
            stacklevel=3,
        )
    if str(low_disk) == "stop" and main_process_says(accelerator, short):
        where = f" ({human_bytes(needed)} needed, {human_bytes(free)} free)" if short else ""
        raise WriteFailed(
            errno.ENOSPC,
            f"no space left on device for checkpoint {final}{where}: stopped before writing (training.low_disk=stop); "
            f"{KEPT}, resume=auto continues from the last one once space is freed",
        )
    return needed


def save_checkpoint(
    accelerator, model, ema, run_dir: Path, state: CheckpointState, keep_last: int, low_disk: str = "warn"
) -> Path:
    """Collective: every rank calls it. Refuses (ValueError) to save non-finite weights; a failed write raises
    WriteFailed (one line), the earlier checkpoints untouched."""
    step = state.step
    ema.sync()
    unwrapped = accelerator.unwrap_model(model)
    if not _all_finite(accelerator, unwrapped) or not all(torch.isfinite(p).all() for p in ema.model.parameters()):
        raise ValueError(f"step {step}: the weights contain NaN/Inf; not saving a checkpoint")
    final = checkpoint_root(run_dir) / f"step_{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    needed = _check_space(accelerator, run_dir, final, low_disk)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, state_dict in (("ema.safetensors", ema.model.state_dict()), (POWER_FILE, ema.power_state())):
                if state_dict:  # (no power-function profiles: no POWER_FILE)
                    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / name)
            (tmp / "config.json").write_text(json.dumps(state.config, indent=1))
            # Last, with every other file's size: marks the checkpoint complete and lets resume check it.
            files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({**state.position, "step": step, "files": files}, indent=1))
            fsync_tree(tmp)  # contents on disk before the rename makes them "complete"
            replace_dir(tmp, final)  # renames (replacing the same step saved again) and fsyncs checkpoints/
            fsync_dir(final.parent.parent)  # the checkpoints/ entry itself, new on the first save
    except Exception as e:  # torch's zip writer says "unexpected pos ..." for a full disk: write_failure names it
        failure = write_failure(e, final, needed, KEPT)  # (while the temporary still fills the disk)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise failure from e
    if accelerator.is_main_process:
        _prune(run_dir, keep_last, final)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir: Path, keep_last: int, saved: Path) -> None:
    """Keep the newest keep_last whole checkpoints (and the one just saved); damaged ones are neither
    counted nor deleted, so a damaged newer checkpoint never costs the last good one. Also removes the
    hidden temporary directories of saves that were killed."""
    root = checkpoint_root(run_dir)
    for stale in root.glob(".step_*.tmp"):
        if stale != saved.with_name(f".{saved.name}.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    whole = [p for p in list_checkpoints(run_dir) if p == saved or checkpoint_problem(p) is None]
    for stale in whole[:-keep_last]:
        if stale != saved:
            shutil.rmtree(stale)


def load_checkpoint(accelerator, model, ema, path: Path, objective: dict | None = None) -> dict:
    """Restore model, optimiser, RNG states and EMA in place; returns the trainer state.

    The architecture (model.config) and the objective's settings must match the checkpoint's;
    runtime choices (fused kernel, compile, gradient checkpointing) are not part of either and may
    change between runs."""
    path = Path(path)
    if problem := checkpoint_problem(path):
        raise ValueError(f"cannot resume from {path}: {problem}")
    meta = read_json(path / "config.json")
    own = ema.model.config.architecture()  # the DiT's (the EMA is a copy of it, whatever wraps the trained model)
    # Keys a checkpoint predates (e.g. backbone options added later) mean their default (DiTConfig.from_dict).
    saved = DiTConfig.from_dict(meta["model"], path / "config.json").architecture()
    diff = {k: (saved.get(k), v) for k, v in own.items() if saved.get(k) != v}
    saved_objective = objective_settings(meta)
    if objective is not None and saved_objective != objective:
        keys = sorted(set(saved_objective) | set(objective))
        diff.update(
            {
                f"objective.{k}": (saved_objective.get(k), objective.get(k))
                for k in keys
                if saved_objective.get(k) != objective.get(k)
            }
        )
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: it differs from the config ({listing})")
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # the checks above read headers only; a record inside can still be bad
        raise ValueError(
            f"cannot resume from {path}: Accelerate cannot load its state ({type(e).__name__}: {e})"
        ) from e
    load_state_dict_checked(ema.model, load_safetensors(path / "ema.safetensors"), path / "ema.safetensors")
    state = read_json(path / STATE_FILE)
    ema.num_updates = state.get("ema_num_updates", state["step"])
    if ema.profiles:
        if not (path / POWER_FILE).is_file():
            raise ValueError(f"cannot resume from {path}: no {POWER_FILE} (trained without training.phema_sigma_rels)")
        ema.load_power_state(load_safetensors(path / POWER_FILE), ema.num_updates)
    return state
