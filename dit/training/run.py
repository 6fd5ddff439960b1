"""Run bookkeeping: the failure note and the finished record (finished.json); the settings digest it records is
dit/training/digest.py's.

What a run directory says about the run itself, as opposed to its metrics (dit.training.logging).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from dit.atomic import atomic_file, fsync_dir

# run_dir/error.txt: why the last attempt stopped (train.py writes it, dit.analysis.report lists it)
FAILURE_NOTE = "error.txt"
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


def mark_finished(run_dir: Path, step: int, settings: str, data: dict | None = None) -> None:
    """Record (atomically) that the run finished at `step` with these settings (settings_digest).
    data: what the report shows of the data (its class names)."""
    info = {"step": step, "settings": settings, "class_names": (data or {}).get("class_names")}
    atomic_file(Path(run_dir) / FINISHED, lambda tmp: Path(tmp).write_text(json.dumps(info) + "\n"))


def unmark_finished(run_dir: Path) -> None:
    """Remove the record durably (a run trained again: the old record no longer holds)."""
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
        warnings.warn(f"{path}: unreadable ({e}); the run is treated as not finished", stacklevel=2)
        return None
    return info
