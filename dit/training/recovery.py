"""What a non-finite loss does (training.nan_policy): stop, skip the step, or roll back to the last whole checkpoint
and skip the global batches from there through the bad one. The decisions and the data positions are here; the
Trainer restores its state (dit/training/loop.py, Trainer._rollback).

A data position is {"epoch", "batch"}: the global batch a step trains on, written epoch:batch.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["advance", "batches_to_skip", "check_rollback", "position_name", "stop_error"]


def position_name(position: dict) -> str:
    return f"{position['epoch']}:{position['batch']}"


def advance(position: dict, batches_per_epoch: int) -> None:
    """Move the data position past the global batch just used (including a skipped one)."""
    position["batch"] += 1
    if position["batch"] == batches_per_epoch:
        position["epoch"], position["batch"] = position["epoch"] + 1, 0


def stop_error(step: int, bad: str) -> FloatingPointError:
    """training.nan_policy=stop."""
    return FloatingPointError(
        f"non-finite loss at step {step} (global batch {bad}); stopping "
        "(training.nan_policy=skip skips such steps, rollback returns to the last checkpoint)"
    )


def check_rollback(step: int, bad: str, history: list[dict], retries: int, path: Path | None) -> None:
    """A FloatingPointError naming the batches rolled back over before, when no rollback is left (retries) or there
    is no checkpoint (path None) to roll back to."""
    why = None
    if len(history) >= retries:
        why = f"after {len(history)} rollbacks (training.rollback_retries)"
    elif path is None:
        why = "and no checkpoint to roll back to"
    if why:
        earlier = "; ".join(f"step {r['step']}: batches {', '.join(r['skipped'])}" for r in history)
        raise FloatingPointError(
            f"non-finite loss at step {step} (global batch {bad}) {why}; stopping"
            + (f". Rolled back before at: {earlier}" if earlier else "")
        )


def batches_to_skip(start: dict, bad: str, batches_per_epoch: int) -> tuple[list[str], dict]:
    """The global batches from ``start`` (a data position) through the bad one, and the position just past it."""
    skipped, position = [], {"epoch": start["epoch"], "batch": start["batch"]}
    while True:
        skipped.append(position_name(position))
        at_bad = skipped[-1] == bad
        advance(position, batches_per_epoch)
        if at_bad:
            return skipped, position
