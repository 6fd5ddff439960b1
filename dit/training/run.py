"""Run bookkeeping: the failure note, the finished record (finished.json) and the settings digest.

What a run directory says about the run itself, as opposed to its metrics (dit.training.logging).
"""

from __future__ import annotations

import json
from pathlib import Path

FAILURE_NOTE = "error.txt"  # run_dir/error.txt: why the last attempt stopped (train.py writes it, dit.report lists it)
# run_dir/finished.json: the run reached its last step and wrote its export. Kept with the results
# (metrics.jsonl, PNGs) where the weights are not, e.g. a study committed without its checkpoints, so that
# a re-run of the study leaves the run alone and the report counts it.
FINISHED = "finished.json"


def note_failure(run_dir: Path, reason: str) -> None:
    """One line saying why a run stopped, for the study report (best effort: the run is failing anyway)."""
    try:
        if run_dir.is_dir():
            (run_dir / FAILURE_NOTE).write_text(" ".join(reason.split())[:500] + "\n")
    except OSError:
        pass


# Settings that change how a run computes, not what: a finished run is not trained again for them. The
# model's are marked in DiTConfig (dit/models/config.py, digest_view).
RUNTIME_KEYS = {
    "training": (
        "compile",
        "gradient_checkpointing",
        "num_workers",
        "log_every",
        "ckpt_every",
        "ckpt_every_minutes",
        "collective_timeout_s",
        "keep_last",
        "inception_weights",
        "domain_classifier",
    )
}


def settings_digest(config: dict) -> str:
    """SHA-256 of what a run's results depend on: its seed and model, data, objective, optimiser and training
    settings (the resolved config train.py passes to the loop), less RUNTIME_KEYS and the model's runtime fields,
    with the samplers the training grids and FID use (a null sampler: the objective's, by name)."""
    import hashlib

    from dit.models.config import digest_view, omit_added_at_default
    from dit.training.config import OptimConfig, TrainConfig

    kept = {k: config.get(k) for k in ("seed", "model", "data", "diffusion", "optim", "training")}
    if isinstance(kept["model"], dict):
        kept["model"] = digest_view(kept["model"])
    for group, schema in (("training", TrainConfig), ("optim", OptimConfig)):
        if isinstance(kept[group], dict):
            kept[group] = omit_added_at_default(schema, kept[group])
    for group, keys in RUNTIME_KEYS.items():
        if isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k not in keys}
    if isinstance(kept["training"], dict) and isinstance(kept["diffusion"], dict):
        kept["training"] = _effective_samplers(kept["training"], kept["diffusion"]["name"])
    if isinstance(kept["diffusion"], dict):
        from dit.diffusion import OBJECTIVES

        kept["diffusion"] = OBJECTIVES[kept["diffusion"]["name"]].digest_view(kept["diffusion"])
    if config.get("init_from"):  # a fine-tune (absent otherwise, so the digests recorded before it still hold)
        kept["init_from"] = [config["init_from"], config.get("init_from_class_map")]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _effective_samplers(training: dict, objective: str) -> dict:
    """training with each sampling setting's null sampler replaced by the one the run uses."""
    from dit.training.config import OBJECTIVE_SAMPLERS, training_sampler

    out = dict(training)
    for key in OBJECTIVE_SAMPLERS:
        if isinstance(out.get(key), dict):
            out[key] = {**out[key], "sampler": training_sampler(key, out[key].get("sampler"), objective)}
    return out


def mark_finished(run_dir: Path, step: int, settings: str, data: dict | None = None) -> None:
    """Record (atomically) that the run finished at `step` with these settings (settings_digest).
    data: what the report shows of the data (its class names)."""
    from dit.atomic import atomic_file

    info = {"step": step, "settings": settings, "class_names": (data or {}).get("class_names")}
    atomic_file(Path(run_dir) / FINISHED, lambda tmp: Path(tmp).write_text(json.dumps(info) + "\n"))


def unmark_finished(run_dir: Path) -> None:
    """Remove the record durably (a run trained again: the old record no longer holds)."""
    from dit.atomic import fsync_dir

    path = Path(run_dir) / FINISHED
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def finished_info(run_dir: Path) -> dict | None:
    """What mark_finished recorded, or None (never finished, or the record is damaged: a warning names it)."""
    path = Path(run_dir) / FINISHED
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise ValueError("no integer 'step'")
    except (ValueError, OSError) as e:
        import warnings

        warnings.warn(f"{path}: unreadable ({e}); the run is treated as not finished", stacklevel=2)
        return None
    return info
