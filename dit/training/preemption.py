"""Stopping when told to: signals, time-based checkpoints, and the decisions every process must take alike.

Clusters do not kill a job out of the blue, they tell it first: SLURM sends SIGTERM on preemption and `scancel`,
and the signal chosen with `--signal` (submitit's USR2, others' USR1) some seconds before the time limit;
Kubernetes sends SIGTERM and waits its grace period; torchrun and `accelerate launch` pass SIGTERM and SIGINT on
to their workers (and SIGKILL them 30 s later). On any of STOP_SIGNALS a run finishes the optimiser step it is
in, every process agrees on the step (Control.agree, once per step, between steps), a checkpoint is written at
that step, the trackers are closed, and train.py exits with EXIT_STOPPED; resume=auto continues exactly. A
second SIGINT aborts at once (a checkpoint being written stays a hidden temporary directory).

Under submitit (hydra/launcher=slurm|local) the handler submitit had installed for the signal (its requeue on
USR2) is called after the checkpoint, so the job is requeued and resumes.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# sysexits' EX_TEMPFAIL: stopped on request with a checkpoint at the step reached; run it again to continue.
EXIT_STOPPED = 75


class Stopped(BaseException):
    """The run stopped on a signal after saving a checkpoint (a BaseException, like KeyboardInterrupt: code that
    catches Exception does not swallow it). train.py turns it into the exit (hand_over)."""

    def __init__(self, signum: int, step: int, checkpoint, previous=None):
        self.signum, self.step, self.checkpoint, self.previous = signum, step, checkpoint, previous
        by = signal.Signals(signum).name if signum else "a signal to another process of the run"
        super().__init__(f"stopped by {by} at step {step}; checkpoint {checkpoint}; resume=auto continues")

    def hand_over(self) -> None:
        """The handler that was installed before the run (submitit's requeue: it exits itself), then exit."""
        previous = self.previous
        for sig in STOP_SIGNALS[:1] + STOP_SIGNALS[2:]:  # already stopping: more of them (not Ctrl-C) change nothing
            signal.signal(sig, signal.SIG_IGN)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)
        sys.exit(EXIT_STOPPED)


class StopRequest:
    """Records the first of STOP_SIGNALS; `with StopRequest() as stop:` installs the handlers (main thread only)
    and puts the previous ones back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def previous_handler(self):
        return self.previous.get(self.signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(
                f"\n{name}: finishing this step, then a checkpoint and exit {EXIT_STOPPED} "
                "(a second Ctrl-C aborts at once)",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT:
            print(f"\n{name} again: aborting without a checkpoint", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        else:
            print(f"\n{name}: already stopping", file=sys.stderr, flush=True)


class Control:
    """Decisions every process takes alike, from flags only some of them may see (a signal that reached one
    rank, a clock past the checkpoint interval, an evaluation left unfinished): one all-reduce (max) of a few
    numbers on the CPU between steps. With several processes it uses a gloo group, so it never waits for the
    accelerator's queue; with one process it is free."""

    def __init__(self, timeout_s: float | None = None):
        self.group = None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and dist.get_backend() != "gloo":
            timeout = timedelta(seconds=timeout_s) if timeout_s else None
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag: true on any process."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in t.tolist())


class CheckpointClock:
    """training.ckpt_every_minutes: due when that long has passed since the last checkpoint (or the start)."""

    now = staticmethod(time.monotonic)

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.reset()

    def reset(self) -> None:
        self.since = self.now()

    def due(self) -> bool:
        return self.seconds > 0 and self.now() - self.since >= self.seconds
