"""A long run stays healthy (issue 25): a few thousand smoke steps with checkpoints, sample grids and FID
evaluations, watched from outside through /proc: resident memory and open file descriptors do not grow once the
run has warmed up (the first checkpoint, grid and evaluation done, the allocator's pools filled).

The run is slow (minutes); the helper that decides "grows" is tested fast on synthetic series.
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SMOKE, needs_fmnist
from helpers.tiny import records
from test_preemption import env, last_step

RSS_TOLERANCE_MIB = 48.0  # Python's and the allocator's pools breathe by tens of MiB around an evaluation
FD_TOLERANCE = 2  # a checkpoint or event file being written at the moment of a sample


def growth(series: list[float]) -> float:
    """How much a series settled at a level rises over its course: the median of its last third minus the median
    of its first third. Medians, so a spike (an evaluation's arrays, a file open while a checkpoint is written)
    does not count; a leak, which rises steadily, does."""
    if len(series) < 6:
        raise ValueError(f"{len(series)} samples are too few to tell growth from noise (need 6)")
    third = len(series) // 3
    return statistics.median(series[-third:]) - statistics.median(series[:third])


def test_growth_tells_a_leak_from_noise_and_spikes():
    rng = np.random.default_rng(0)
    flat = list(500 + rng.normal(0, 4, 300))
    assert abs(growth(flat)) < 3
    spiky = list(flat)
    for i in range(0, 300, 50):  # an evaluation every 50 samples, 120 MiB for a moment
        spiky[i] += 120
    assert abs(growth(spiky)) < 3
    leak = [v + 0.5 * i for i, v in enumerate(flat)]  # 0.5 MiB a sample: 100 MiB from first third to last
    assert growth(leak) == pytest.approx(100, abs=5)
    fds = [20] * 100 + [21] * 100 + [22] * 100  # a handle left open now and then
    assert growth(fds) == 2
    with pytest.raises(ValueError, match="too few"):
        growth([1, 2, 3])


def rss_mib_and_fds(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


STEPS, WARMUP = 3000, 1000
SOAK = [
    f"training.total_steps={STEPS}",
    "training.log_every=10",
    "training.ckpt_every=250",
    "training.keep_last=2",
    "training.sample_every=500",
    "training.fid_every=500",
    "training.fid_samples=100",
    "training.fid_sampling.steps=5",
    "training.fid_metric=fashion_mnist",
    "training.fid_ref=fashion_mnist:test",
]


@pytest.mark.slow
@needs_fmnist
@pytest.mark.filterwarnings("ignore:.*unreliable")
def test_a_long_run_does_not_grow(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) to watch the run")
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *SMOKE, *SOAK, f"hydra.run.dir={run}"]
    log = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: a pipe nobody reads blocks the run when full
    proc = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=log)
    rss, fds, deadline = [], [], time.monotonic() + 1800
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the soak run did not finish in 30 minutes"
        if last_step(run) >= WARMUP:
            try:
                r, f = rss_mib_and_fds(proc.pid)
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                break  # it ended between poll() and the read
            rss.append(r)
            fds.append(f)
        time.sleep(0.2)
    code = proc.wait()
    log.close()
    assert code == 0, (tmp_path / "stderr.txt").read_text(errors="replace")[-3000:]
    assert last_step(run) == STEPS
    # the run did what the soak is about: grids and evaluations every 500 steps, checkpoints every 250
    assert len(list((run / "samples").glob("step_*.png"))) == STEPS // 500
    assert [r["step"] for r in records(run) if "fid" in r] == list(range(500, STEPS + 1, 500))
    summary = (
        f"{len(rss)} samples after step {WARMUP}: RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f}), "
        f"fds {fds[0]} -> {fds[-1]} (max {max(fds)})"
    )
    print(summary)
    assert growth(rss) < RSS_TOLERANCE_MIB, summary
    assert growth(fds) <= FD_TOLERANCE, summary
