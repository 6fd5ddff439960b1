"""Experiment trackers through Accelerate: the logger/ group, TensorBoard read back, wandb offline, resume."""

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, needs_fmnist, smoke_config
from helpers.tiny import records
from omegaconf import OmegaConf

import train
from dit.training.logging import TRACKING_DIR, flat_config, trackers


def logger_cfg(*overrides) -> dict:
    return OmegaConf.to_container(smoke_config(*overrides).logger, resolve=True)


def tensorboard_events(run_dir: Path, project: str = "dit"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TRACKING_DIR / project), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_logger_group_selects_trackers(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb.yaml's mode follows the environment
    assert trackers(logger_cfg()) == ["tensorboard"]  # the default (logger=local)
    assert trackers(logger_cfg("logger=tensorboard")) == ["tensorboard"]
    assert trackers(logger_cfg("logger=none")) == []
    assert trackers(logger_cfg("logger=wandb")) == ["wandb"]
    both = logger_cfg("logger=[tensorboard,wandb]", "logger.project=mine")
    assert (
        trackers(both) == ["tensorboard", "wandb"] and both["project"] == "mine" and both["wandb"]["mode"] == "offline"
    )
    assert trackers(logger_cfg("logger=wandb", "logger.wandb.mode=disabled")) == []
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers(logger_cfg("logger=[tensorboard,wandb]")) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        trackers({"neptune": {}})
    # Every shipped tracker config composes; those whose package is missing say how to install it.
    for name in sorted(p.stem for p in (ROOT / "configs" / "logger").glob("*.yaml")):
        cfg = logger_cfg(f"logger={name}")
        try:
            trackers(cfg)
        except ValueError as e:
            assert "pip install" in str(e), e


def test_flat_config_for_tensorboard_hparams():
    flat = flat_config({"model": {"depth": 2, "betas": [0.9, 0.99], "name": None}, "seed": 0})
    assert flat == {"model.depth": 2, "model.betas": "[0.9, 0.99]", "model.name": None, "seed": 0}


@needs_fmnist
def test_tensorboard_scalars_images_and_resume(tmp_path):
    """Scalars and sample grids read back from the event files; a resume from step 3 after a run reached
    step 6 replaces steps 4-6 in TensorBoard (purge_step) as in metrics.jsonl."""
    run = tmp_path / "run"
    train.run(smoke_config("training.sample_every=3", "training.keep_last=0"), run)
    first = [r["loss"] for r in records(run)]
    events = tensorboard_events(run)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([e.value for e in events.Scalars("loss")], first, rtol=1e-6)
    assert "lr" in events.Tags()["scalars"] and "steps_per_s" in events.Tags()["scalars"]
    grids = events.Images("samples")
    assert [e.step for e in grids] == [3, 6] and grids[-1].width == 2 * 34 + 2 and grids[-1].height == 10 * 34 + 2

    # Back to step 3: the second run logs steps 4-6 again (with a shifted data order, so other values).
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000006")
    train.run(smoke_config("training.sample_every=3", "training.keep_last=0", "seed=1"), run)
    second = records(run)
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5, 6] and [r["loss"] for r in second][3:] != first[3:]
    events = tensorboard_events(run)
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]  # no duplicates of 4-6
    np.testing.assert_allclose([e.value for e in losses], [r["loss"] for r in second], rtol=1e-6)


@needs_fmnist
def test_wandb_offline_and_tensorboard_together_resume_the_same_run(tmp_path):
    run = tmp_path / "run"
    both = ["logger=[tensorboard,wandb]", "logger.wandb.mode=offline"]
    train.run(smoke_config(*both, "training.total_steps=3", "training.sample_every=3"), run)
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # the run's records, written without network
    train.run(smoke_config(*both, "training.total_steps=5"), run)  # resume=auto from step 3
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same run id, continued
    assert [e.step for e in tensorboard_events(run).Scalars("loss")] == [1, 2, 3, 4, 5]


def test_loss_axis_is_log_only_when_every_value_is_positive():
    """REPA's term (-cosine) makes the total loss negative: a log axis would drop those points and draw a line that
    ends at step ~350 (make train's loss.png did); the axis is linear then, log when every value is positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dit.training.logging import log_scale_if_positive

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1.0, 0.1, 0.01])
    log_scale_if_positive(ax)
    assert ax.get_yscale() == "log"
    ax.plot([1, 2, 3], [0.5, -0.1, -0.2])
    log_scale_if_positive(ax)
    assert ax.get_yscale() == "linear"
    plt.close(fig)
