"""Surviving a cluster (issue 25): stop signals, time-based checkpoints, requeue, a dead rank, a bad batch.

A run told to stop (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) at a random moment writes a checkpoint at the step it
reached, exits with EXIT_STOPPED within the bound the README states, and resumed with resume=auto ends with exactly
the weights of an uninterrupted run; one process here, two gloo processes and submitit's requeue in the slow tier.
"""

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, needs_fmnist, smoke_config
from helpers.tiny import records

import train
from dit.training.checkpointing import list_checkpoints
from dit.training.preemption import EXIT_STOPPED, Stopped, StopRequest

STEPS = 60
RUN = ["training.total_steps=60", "training.ckpt_every=0", "training.log_every=1"]
EXIT_BOUND_S = 15  # signal to exit for the smoke model: one step, the checkpoint, interpreter exit (~3 s here)


def env(**extra) -> dict:
    # the thread count of this process: the last steps run here, and matmul sums depend on it
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "WANDB_MODE": "disabled", **extra}


def last_step(run: Path) -> int:
    """The step of metrics.jsonl's last whole record (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def signal_when_training(proc, run: Path, sig, rng: random.Random, after_step: int, pids=None) -> float:
    """Send `sig` (to proc, or to `pids()`) at a random moment once the run has logged a step past after_step;
    returns when it was sent."""
    deadline = time.monotonic() + 300
    while last_step(run) <= after_step or not (targets := pids() if pids else [proc.pid]):
        assert proc.poll() is None, f"the run ended before it was signalled: {proc.stderr.read()[-3000:]!r}"
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.4))
    for pid in targets:
        os.kill(pid, sig)
    return time.monotonic()


def stopped_run(run: Path, sig, rng: random.Random, after_step: int, command: list[str], pids=None) -> int:
    """Start `command`, signal it mid-training; checks the exit and the checkpoint; returns the step reached."""
    proc = subprocess.Popen(command, cwd=run.parent, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sent = signal_when_training(proc, run, sig, rng, after_step, pids)
    proc.wait(timeout=120)
    took = time.monotonic() - sent
    err = proc.stderr.read().decode(errors="replace")
    assert proc.returncode == EXIT_STOPPED, f"exit {proc.returncode}: {err[-3000:]}"
    assert took < EXIT_BOUND_S, f"{took:.1f} s from {sig.name} to exit"
    reached = last_step(run)
    assert after_step < reached < STEPS
    assert [p.name for p in list_checkpoints(run)][-1] == f"step_{reached:07d}"  # saved at the step reached
    assert f"stopped by {sig.name} at step {reached}" in err and sig.name in (run / "error.txt").read_text()
    return reached


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@needs_fmnist
def test_sigterm_then_sigusr1_then_resume_equals_an_uninterrupted_run(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)  # the moments; printed by pytest on failure through the assertion messages below
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *SMOKE, *RUN, f"hydra.run.dir={run}"]
    first = stopped_run(run, signal.SIGTERM, rng, 0, command)
    second = stopped_run(run, signal.SIGUSR1, rng, first, command)
    assert first < second, f"seed {seed}"
    result = train.run(smoke_config(*RUN), run)  # resume=auto, to the end
    reference = train.run(smoke_config(*RUN), tmp_path / "uninterrupted")
    assert result["step"] == STEPS
    assert_same_weights(result["model"], reference["model"])
    assert_same_weights(result["ema"], reference["ema"])
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))  # each step logged once


def test_a_second_sigint_aborts_at_once_and_handlers_are_put_back():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR2)  # already stopping: noted, nothing else
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in this thread between bytecodes
    assert signal.getsignal(signal.SIGINT) is before


@needs_fmnist
@pytest.mark.filterwarnings("ignore:.*unreliable")  # 20 samples < 128 feature dimensions: figures compared, not read
def test_a_stop_during_an_evaluation_is_finished_on_resume(tmp_path, monkeypatch):
    """A signal while the FID samples are drawn: the evaluation is abandoned between sampling batches, the
    checkpoint records it, and the resumed run evaluates that step first: the same figures as uninterrupted."""
    import dit.training.evaluation as evaluation
    from dit.eval.stats import ImageSource

    monkeypatch.setattr(evaluation, "EVAL_BATCH_SIZE", 8)  # 20 samples in 3 batches: a moment between them
    ref = ImageSource("fashion_mnist:test")  # 500 test images as the reference (an ADM-style npz): quick
    np.savez(tmp_path / "ref.npz", arr_0=ref.array[:500], arr_1=ref.labels[:500])
    overrides = [
        "training.fid_every=3",
        "training.fid_samples=20",
        "training.fid_sampling.steps=2",
        "training.ckpt_every=0",
        "training.fid_metric=fashion_mnist",
        f"training.fid_ref={tmp_path / 'ref.npz'}",
    ]
    real = evaluation.generate

    def signalled_in_the_first_evaluation(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 0 and not (tmp_path / "sent").exists():
                (tmp_path / "sent").touch()
                os.kill(os.getpid(), signal.SIGUSR2)
            yield batch

    monkeypatch.setattr(evaluation, "generate", signalled_in_the_first_evaluation)
    run = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        train.run(smoke_config(*overrides), run)
    assert stopped.value.step == 3 and not [r for r in records(run) if "fid" in r]
    state = json.loads((run / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["pending"] == ["evaluate"]
    monkeypatch.setattr(evaluation, "generate", real)
    result = train.run(smoke_config(*overrides), run)
    reference = train.run(smoke_config(*overrides), tmp_path / "uninterrupted")
    assert_same_weights(result["model"], reference["model"])
    fids = [[(r["step"], r["fid"]) for r in records(d) if "fid" in r] for d in (run, tmp_path / "uninterrupted")]
    assert fids[0] == fids[1] and [s for s, _ in fids[0]] == [3, 6]


@needs_fmnist
def test_time_based_checkpoints(tmp_path, monkeypatch):
    import dit.training.preemption as preemption

    clock = iter(range(0, 10**6, 40))  # each look at the clock: 40 s later
    monkeypatch.setattr(preemption.CheckpointClock, "now", staticmethod(lambda: next(clock)))
    train.run(smoke_config("training.ckpt_every=0", "training.ckpt_every_minutes=1", "training.keep_last=0"), tmp_path)
    # Read at the start (0), then before each step (40 s: not due; 80 s: due, saved, the clock reset at 120 s),
    # so due every second step from step 1; step 6 is the final checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_000000{s}" for s in (1, 3, 5, 6)]


# --- a bad batch -----------------------------------------------------------------------------------------


class BadBatches(torch.utils.data.Dataset):
    """The dataset with NaN images at the given indices (a corrupt shard, an overflow)."""

    def __init__(self, dataset, bad: set[int]):
        self.dataset, self.bad = dataset, bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x * float("nan") if i in self.bad else x), y

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def global_batch(cfg, n: int, b: int) -> list[int]:
    """The dataset indices of global batch b of epoch 0 (one process, no accumulation)."""
    from dit.data import GlobalBatchSampler

    size = cfg.training.global_batch_size
    sampler = GlobalBatchSampler(n, size, 1, 0, 1, cfg.seed)
    return sampler.permutation(0)[b * size : (b + 1) * size].tolist()


@needs_fmnist
def test_rollback_skips_the_batches_that_led_to_a_non_finite_loss(tmp_path, monkeypatch, capsys):
    overrides = ["training.nan_policy=rollback", "training.ckpt_every=3", "training.total_steps=8"]
    cfg = smoke_config(*overrides)
    real = train.build_data
    n = len(real(cfg))
    monkeypatch.setattr(train, "build_data", lambda c: BadBatches(real(c), set(global_batch(cfg, n, 4))))
    result = train.run(cfg, tmp_path / "run")  # step 5 trains on batch 4: back to step 3, batches 3 and 4 skipped
    assert result["step"] == 8 and all(torch.isfinite(p).all() for p in result["model"].parameters())
    rollback = [r for r in records(tmp_path / "run") if "rollback_from_step" in r]
    assert rollback == [{"step": 3, "rollback_from_step": 4, "skipped_batches": ["0:3", "0:4"]}]
    assert "skipping global batches 0:3, 0:4" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == list(range(1, 9))

    # The reference: the same checkpoint at step 3, resumed with its data position moved past batch 4 by hand.
    monkeypatch.setattr(train, "build_data", real)
    ref = tmp_path / "ref"
    train.run(smoke_config(*overrides, "training.total_steps=3"), ref)
    state_file = ref / "checkpoints" / "step_0000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["batch"] == 3
    state_file.write_text(json.dumps({**state, "batch": 5}))
    reference = train.run(smoke_config(*overrides), ref)
    assert_same_weights(result["model"], reference["model"])
    assert_same_weights(result["ema"], reference["ema"])


@needs_fmnist
@pytest.mark.parametrize("case", ["retries", "no_checkpoint"])
def test_rollback_is_bounded_and_names_the_batches(tmp_path, monkeypatch, case):
    overrides = ["training.nan_policy=rollback", "training.rollback_retries=2", "training.total_steps=12"]
    overrides.append("training.ckpt_every=2" if case == "retries" else "training.ckpt_every=0")
    cfg = smoke_config(*overrides)
    real = train.build_data
    n = len(real(cfg))
    bad = set().union(*(global_batch(cfg, n, b) for b in range(3, 16)))  # every batch from the fourth on
    monkeypatch.setattr(train, "build_data", lambda c: BadBatches(real(c), bad))
    if case == "retries":
        # batch 3 at step 3: back to step 2, batches 2-3 skipped; batch 4 at step 2: back again, batch 4 skipped
        message = (
            r"non-finite loss at step 2 \(global batch 0:5\) after 2 rollbacks \(training.rollback_retries\); "
            r"stopping. Rolled back before at: step 3: batches 0:2, 0:3; step 2: batches 0:4$"
        )
    else:
        message = r"non-finite loss at step 3 \(global batch 0:3\) and no checkpoint to roll back to"
    with pytest.raises(FloatingPointError, match=message):
        train.run(cfg, tmp_path)


# --- a dead rank -----------------------------------------------------------------------------------------


@pytest.mark.slow  # two gloo processes, one killed, the other waits out its 20 s timeout
@needs_fmnist
def test_a_killed_rank_ends_the_other_within_the_timeout(tmp_path):
    """Two gloo processes started as a scheduler starts them (RANK, WORLD_SIZE, MASTER_ADDR set); one is killed
    with SIGKILL mid-run; the other exits non-zero with one line naming what happened, within the timeout."""
    run, timeout = tmp_path / "run", 20
    port = str(29600 + os.getpid() % 300)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *SMOKE,
        "training.total_steps=100000",
        "training.ckpt_every=0",
        f"training.collective_timeout_s={timeout}",
        f"hydra.run.dir={run}",
    ]
    procs = []
    for rank in (0, 1):
        ranks = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env={**env(), **ranks, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        signal_when_training(procs[0], run, signal.SIGKILL, random.Random(), 2, pids=lambda: [procs[1].pid])
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, EXIT_STOPPED) and took < timeout + 15, (took, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another process of this run is gone or stopped answering" in lines[0], err[-3000:]


# --- launchers: two processes under torchrun, submitit's requeue (slow: several launches each) --------------


def children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]


@pytest.mark.slow  # three launches of two processes: ~1 min on the 2-core machine
@needs_fmnist
def test_two_processes_signalled_then_resumed_equal_an_uninterrupted_pair(tmp_path):
    """torchrun, 2 gloo processes: SIGTERM to torchrun (which passes it on to its workers), then SIGUSR1 to the
    workers themselves (as `scancel --signal=USR1` does); both times a checkpoint at the step reached; resumed
    to the end, the weights equal those of an uninterrupted 2-process run."""
    from safetensors.torch import load_file

    rng = random.Random()
    port = str(29900 + os.getpid() % 90)

    def torchrun(run: Path) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        return [*launcher, str(ROOT / "train.py"), *SMOKE, *RUN, f"hydra.run.dir={run}"]

    ranks = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    for sig, to_workers in ((signal.SIGTERM, False), (signal.SIGUSR1, True)):
        proc = subprocess.Popen(
            torchrun(run), cwd=tmp_path, env=env(**ranks), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        before, workers = last_step(run), functools.partial(children, proc.pid)
        sent = signal_when_training(proc, run, sig, rng, before, pids=workers if to_workers else None)
        proc.wait(timeout=120)
        err = proc.stderr.read().decode(errors="replace")
        assert time.monotonic() - sent < EXIT_BOUND_S and proc.returncode != 0, err[-3000:]
        reached = last_step(run)
        assert before < reached < STEPS and list_checkpoints(run)[-1].name == f"step_{reached:07d}", err[-3000:]
        assert f"stopped by {sig.name} at step {reached}" in err
    for directory in (run, tmp_path / "uninterrupted"):
        done = subprocess.run(torchrun(directory), cwd=tmp_path, env=env(**ranks), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(d / "model" / name) for d in (run, tmp_path / "uninterrupted"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))


@pytest.mark.slow  # one job started three times through submitit: ~40 s
@needs_fmnist
def test_submitit_requeues_a_signalled_job_which_resumes(tmp_path):
    """hydra/launcher=local (submitit's local executor, the same code path as hydra/launcher=slurm): USR2, the
    signal submitit asks SLURM to send before the time limit, reaches the job's process twice; each time the run
    saves, submitit requeues the job, and the requeued job resumes with resume=auto; the multirun succeeds with
    the weights of an uninterrupted run."""
    import psutil

    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *SMOKE,
        *RUN,
        "logger=none",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=run",
        "seed=0",
    ]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run, rng = sweep / "run", random.Random()

    found = []

    def task() -> list[int]:  # the job's process (a new one after each requeue)
        found[:] = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if "submitit.core._submit" in p.cmdline()
        ]
        return [p.pid for p in found]

    for _ in range(2):
        saved = list_checkpoints(run)
        resumed_from = int(saved[-1].name.split("_")[1]) if saved else 0
        signal_when_training(proc, run, signal.SIGUSR2, rng, resumed_from, pids=task)  # once training again
        psutil.wait_procs(found, timeout=60)  # saved and requeued
    _, err = proc.communicate(timeout=300)
    logs = "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").rglob("*_log.*")))
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:] + logs[-4000:]
    requeued = [line for line in logs.splitlines() if line.startswith("submitit INFO") and "Requeued job" in line]
    assert len(requeued) == 2 and logs.count("stopped by SIGUSR2") == 2, logs[-3000:]
    result = train.run(smoke_config(*RUN), tmp_path / "uninterrupted")
    from safetensors.torch import load_file

    exported = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in result["model"].state_dict().items())
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))
