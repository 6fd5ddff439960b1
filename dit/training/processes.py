"""The processes of a run: the Accelerator each one builds (mixed precision, trackers, the process group's timeout,
TF32), and what a process does when another one of the run is lost."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

from dit.training.config import TrainConfig
from dit.training.logging import trackers, tracking_config

__all__ = ["LostProcess", "build_accelerator", "collective_failure"]


def build_accelerator(cfg: TrainConfig, logger_config: dict | None, run_dir: Path) -> Accelerator:
    """This process's Accelerator for a run: cfg.mixed_precision, the trackers of the logger/ config group (their
    files under run_dir), cfg.collective_timeout_s as the process group's timeout, TF32 matmuls on CUDA as cfg.tf32
    says."""
    # A run owns its process's Accelerate settings: a worker that runs sweep jobs one after another (the pool
    # launcher) still holds the previous job's, and Accelerate refuses a new mixed precision against them. The
    # process group (PartialState) stays: it belongs to the process, not to the run.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    timeout = cfg.collective_timeout_s
    accelerator = Accelerator(
        mixed_precision=getattr(cfg.mixed_precision, "value", cfg.mixed_precision),
        log_with=trackers(logger_config) or None,
        project_config=tracking_config(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else None,
    )
    if accelerator.device.type == "cuda":  # set either way: the previous job in this process may have turned it on
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        if cfg.tf32:
            torch.backends.cudnn.allow_tf32 = True  # torch's default; only matmuls are fp32 unless asked
    return accelerator


class LostProcess(RuntimeError):
    """Another process of the run died or stopped answering within training.collective_timeout_s."""

    @classmethod
    def after(cls, e: RuntimeError, step: int, last_checkpoint) -> LostProcess:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return cls(
            f"step {step}: another process of this run is gone or stopped answering ({first[:300]}); "
            f"this process stops too. Last checkpoint: {last_checkpoint or 'none'}; resume=auto continues from it"
        )


def collective_failure(e: RuntimeError) -> bool:
    """An error raised by a collective (gloo's and NCCL's errors, torch.distributed's DistError)."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(k in text for k in ("gloo", "NCCL", "Timed out"))
