"""One writer per run directory (dit.atomic.RunLock): a second train.py on a busy run directory is refused at once,
naming the holder, and the first finishes untouched; a dead holder's lock is taken over with a warning; a filesystem
without locking is a warning, not a hang; dit.eval writing into a run directory follows the same rule."""

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, needs_fmnist

from dit.atomic import LOCK_FILE, RunDirBusy, RunLock


def snapshot(root: Path) -> dict:
    """Every file under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == pid:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{proc.args} never held {lock} (exit code {proc.poll()})")


@needs_fmnist
def test_a_second_train_on_a_busy_run_directory_is_refused_and_the_first_finishes_untouched(tmp_path):
    """The first train.py holds the lock (paused with SIGSTOP right after taking it, so the second surely meets it);
    the second, with other settings, exits 1 with one line naming the holder and the way out, having written nothing
    there; the first then finishes alone: one history in metrics.jsonl, its own .hydra/ record."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *SMOKE, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_holder(run / LOCK_FILE, first.pid, first)
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run)
        tic = time.monotonic()
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *SMOKE, "seed=1", f"hydra.run.dir={run}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        refused_in = time.monotonic() - tic
        assert snapshot(run) == before  # not even .hydra/, error.txt or the log
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    holder = rf"pid {first.pid} on {socket.gethostname()} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(.*train\.py .*\)"
    assert re.fullmatch(
        rf"error: {run} is in use by {holder}: wait for it to finish, or choose another: hydra\.run\.dir=\.\.\.", last
    ), last
    assert refused_in < 60, refused_in  # the import of train.py; no waiting for the lock
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "seed=1" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert not (run / "error.txt").exists() and (run / LOCK_FILE).read_text() == ""  # released: no holder


def test_busy_then_released(tmp_path):
    """In one process too (flock is per open file): busy while held, naming this process; free once released."""
    with RunLock(tmp_path) as held:
        assert held.holder()["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=rf"^{tmp_path} is in use by pid {os.getpid()} on .*: wait .*try later$"):
            RunLock(tmp_path, way_out="try later").acquire()
    assert RunLock(tmp_path).holder() == {}
    with RunLock(tmp_path):  # free again, without a warning (a clean release leaves no holder)
        pass


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path):
    """The holder was SIGKILLed: its record stays in the file, the flock went with it."""
    code = (
        "import os, signal, sys; from dit.atomic import RunLock; "
        "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=120)
    assert dead.returncode == -signal.SIGKILL
    stale = RunLock(tmp_path).holder()
    assert stale["pid"] != os.getpid()
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {stale['pid']} on .*no longer holds it"):
        lock = RunLock(tmp_path).acquire()
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def test_a_filesystem_without_locking_is_a_warning_not_a_hang(tmp_path, monkeypatch):
    """Some NFS mounts answer flock with ENOLCK: the run goes on, unlocked, saying so."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    tic = time.monotonic()
    with pytest.warns(UserWarning, match=r"cannot lock .*run\.lock \(No locks available: a filesystem without locking"):
        with RunLock(tmp_path) as lock:
            assert lock.fd is None
    assert time.monotonic() - tic < 1


def test_only_the_main_process_locks(tmp_path):
    """The other processes of a multi-process run (RANK > 0) take no lock: the main one holds it for the run."""
    with RunLock(tmp_path):
        with RunLock(tmp_path, enabled=False):
            pass


def test_dit_eval_writing_into_a_busy_run_directory_is_refused(tmp_path):
    """python -m dit.eval ref -o <run>/...: refused at once (before computing anything) while the run trains."""
    from dit.eval.__main__ import main

    out = tmp_path / "fid" / "ref.npz"
    with RunLock(tmp_path):
        with pytest.raises(SystemExit, match=rf"^error: {tmp_path} is in use by pid {os.getpid()} .*\(-o \.\.\.\)$"):
            main(["ref", "fashion_mnist:test", "-o", str(out), "--metric", "fashion_mnist", "--device", "cpu"])
    assert not out.exists()
