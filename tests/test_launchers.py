"""Hydra launchers (configs/hydra/launcher/): a real multirun through submitit's local executor, whose
runs dit.analysis.report collects, one job over two processes, and the sbatch script hydra/launcher=slurm asks for."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config, needs_fmnist
from helpers.tiny import records
from omegaconf import OmegaConf

from dit.analysis.report import main as report_main

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def multirun_command(sweep_dir, launcher, *overrides):
    """python train.py -m experiment=smoke ... hydra/launcher=<launcher>, each job in <sweep_dir>/<block>."""
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "training.total_steps=4", "logger=none"]
    cmd += [f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${model.block}"]
    return [*cmd, *overrides]


def launch(cmd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def multirun(sweep_dir, *overrides, env=None):
    """A multirun through hydra/launcher=local that must succeed."""
    done = launch(multirun_command(sweep_dir, "local", *overrides), env)
    assert done.returncode == 0, done.stdout + done.stderr


def report(sweep, tmp_path) -> str:
    """python -m dit.analysis.report <sweep> (its main, in this process): the markdown it writes."""
    out = tmp_path / "report.md"
    report_main([str(sweep), "-o", str(out)])
    return out.read_text()


@pytest.mark.slow  # ~75 s of two submitit jobs; the pool launcher's test (make ablation's path) stays in make test
@needs_fmnist
def test_local_launcher_runs_jobs_as_processes_and_report_collects_them(tmp_path):
    sweep = tmp_path / "sweep"
    multirun(sweep, "model.block=adaln,adaln_zero")
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name != "%j")
    assert len(jobs) == 2  # two submitit jobs (two processes), not Hydra's in-process basic launcher
    for block in ("adaln", "adaln_zero"):
        run = sweep / block
        assert (run / "model" / "config.json").exists() and (run / "model" / "ema.safetensors").exists()
        assert 4 in [r["step"] for r in records(run)]
    text = report(sweep, tmp_path)
    assert "2 of 2 runs finished" in text and "| adaln |" in text and "| adaln_zero |" in text


@pytest.mark.slow  # a second multirun of ~25 s on the 2-core machine; the only check of train.py's submitit hook
@needs_fmnist
def test_one_job_over_two_tasks_is_one_distributed_run(tmp_path):
    """tasks_per_node=2: train.py exports RANK/WORLD_SIZE/... so Accelerate sees two processes (gloo on CPU)."""
    sweep = tmp_path / "sweep"
    multirun(sweep, "model.block=adaln", "hydra.launcher.tasks_per_node=2", env={"ACCELERATE_USE_CPU": "1"})
    ckpt = sweep / "adaln" / "checkpoints" / "step_0000004"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()  # one per rank
    assert (sweep / "adaln" / "model" / "config.json").exists()


def test_slurm_launcher_asks_for_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script submitit writes for hydra/launcher=slurm (parameters passed as the plugin passes them)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    srun = tmp_path / "bin" / "srun"  # submitit refuses to build a SLURM executor where there is no srun
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    overrides = [
        "experiment=ablate_conditioning",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=8",
    ]
    params = OmegaConf.to_container(
        compose_config("train", overrides, return_hydra_config=True).hydra.launcher, resolve=True
    )
    params.pop("_target_"), params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "%j", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--nodes=1",
        "--cpus-per-task=8",
        "--time=1440",
    ):
        assert f"#SBATCH {line}\n" in sbatch


@needs_fmnist
@pytest.mark.slow  # ~24 s: three jobs through the pool launcher
def test_pool_launcher_a_failed_job_leaves_the_others_and_a_rerun_skips_finished_ones(tmp_path):
    """hydra/launcher=pool (make ablation): a job with bad input fails alone (the worker that ran it trains the next
    job), says why in error.txt, the report lists it; the same command again trains nothing that is finished."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    cmd = multirun_command(sweep, "pool", "hydra.launcher.n_jobs=1")
    first = launch([*cmd, "model.block=bogus,adaln"])
    assert first.returncode != 0 and "unknown block 'bogus'" in first.stderr
    assert (sweep / "adaln" / "model" / "config.json").exists()  # the other job finished
    assert (sweep / "bogus" / "error.txt").read_text().startswith("ValueError: unknown block 'bogus'; valid blocks: ")
    weights = (sweep / "adaln" / "model" / "ema.safetensors").stat().st_mtime_ns
    again = launch([*cmd, "model.block=adaln"])
    assert again.returncode == 0 and "already finished at step 4" in again.stdout + again.stderr
    assert (sweep / "adaln" / "model" / "ema.safetensors").stat().st_mtime_ns == weights
    text = report(sweep, tmp_path)
    assert "1 of 2 runs finished" in text and "`bogus`: failed" in text and "unknown block 'bogus'" in text


@pytest.mark.slow  # ~15 s: a sweep's second job in the same worker; the pool launcher's path is tested in make test
@needs_fmnist
def test_pool_launcher_runs_a_bf16_job_after_an_fp32_job_in_the_same_process(tmp_path):
    """One pool worker runs its jobs one after another in one process (make speedrun's bf16 arm after an fp32 arm):
    each job starts from its own Accelerate settings, not the previous job's (Accelerate refuses to change them)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "training.total_steps=2", "logger=none"]
    cmd += ["hydra/launcher=pool", "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={sweep}"]
    cmd += ["hydra.sweep.subdir=${training.mixed_precision}", "training.mixed_precision=no,bf16"]
    done = launch(cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    for precision in ("no", "bf16"):
        assert (sweep / precision / "model" / "config.json").exists()
        assert OmegaConf.load(sweep / precision / ".hydra" / "config.yaml").training.mixed_precision == precision
