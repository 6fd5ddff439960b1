"""Train a DiT with Accelerate. Hydra composes configs/train.yaml; any field can be overridden:

    python train.py experiment=fashion_mnist_cpu                      # what `make train` runs
    python train.py model=dit_b2 model.block=cross_attn data=imagefolder data.dataset.root=/data/x
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py experiment=dit_xl2_imagenet256 ...
    python train.py --cfg job                                           # show the composed config

Writes to the run directory (outputs/<data>-<model>-<block>/): checkpoints/, samples/, metrics.jsonl,
loss.png and model/ (the EMA export that sample.py loads). resume=auto (the default) continues from
the latest checkpoint there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dit.atomic import RunDirBusy, RunLock, atomic_file, remove_stale_temporaries
from dit.data import Subset
from dit.training import OptimConfig, TrainConfig, TrainingJob, train
from dit.training.checkpointing import list_checkpoints
from dit.training.config import register_configs
from dit.training.preemption import Stopped
from dit.training.processes import LostProcess
from dit.training.run import FAILURE_NOTE, note_failure

register_configs()  # the schemas and resolvers configs/ is composed with (here: also in a launcher's workers)


class RunFailed(RuntimeError):
    """A job of a multirun stopped by bad input or a failed save; its message is the one-line reason."""


def build(node: DictConfig):
    """hydra.utils.instantiate, re-raising our own error (not Hydra's wrapper) so users see its message."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise


def build_data(cfg: DictConfig):
    """The dataset, and cfg.data's input_size / in_channels / num_classes filled in or checked against it."""
    dataset = build(cfg.data.dataset)
    if cfg.data.get("limit"):
        dataset = Subset(dataset, cfg.data.limit)
    if len(dataset) == 0:
        raise ValueError(f"the dataset ({cfg.data.name}) is empty")
    found = {"input_size": dataset.input_size, "in_channels": dataset.channels, "num_classes": dataset.num_classes}
    with open_dict(cfg):
        for key, value in found.items():
            declared = cfg.data.get(key)
            if declared is None:
                cfg.data[key] = value
            elif declared != value:
                raise ValueError(f"data.{key}={declared} but the dataset ({cfg.data.name}) has {value}")
    return dataset


def build_map_images(cfg: DictConfig):
    """For a model with a spatial condition (model.cond_map): data.dataset at split training.map_split, the held-out
    images whose maps condition the evaluation samples and the grids; None otherwise."""
    if not cfg.model.get("cond_map"):
        return None
    if "split" not in cfg.data.dataset:
        raise ValueError(
            f"model.cond_map={cfg.model.cond_map}: the samples are conditioned on held-out images' maps "
            f"(training.map_split), but data.dataset ({cfg.data.name}) has no split"
        )
    node = cfg.data.dataset.copy()
    with open_dict(node):
        node.split = cfg.training.map_split
    return build(node)


def build_job(cfg: DictConfig, run_dir: Path) -> TrainingJob:
    """What the Trainer trains: the data, model, objective (and VAE) built from the composed config, with the typed
    settings."""
    if cfg.resume in (None, "none") and list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already has checkpoints; resume=auto continues them, or choose another run directory"
        )
    dataset = build_data(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build(cfg.model)
    objective = build(cfg.diffusion)  # the training objective (configs/diffusion/)
    vae = None
    if dataset.latent:
        from diffusers import AutoencoderKL  # latent data only: diffusers' import costs seconds

        vae = AutoencoderKL.from_pretrained(dataset.vae).eval()  # for the sample grids
    data_meta = dict(
        name=cfg.data.name,
        class_names=list(dataset.class_names or []) or None,
        latent=dataset.latent,
        vae=getattr(dataset, "vae", None),
        image_size=getattr(dataset, "image_size", None),
    )
    training: TrainConfig = OmegaConf.to_object(cfg.training)  # typed by the schema (dit/training/config.py)
    optim: OptimConfig = OmegaConf.to_object(cfg.optim)
    config = OmegaConf.to_container(cfg, resolve=True)
    return TrainingJob(
        model,
        dataset,
        objective,
        run_dir,
        training,
        optim,
        seed=cfg.seed,
        resume=cfg.resume,
        config=config,
        data_meta=data_meta,
        vae=vae,
        logger_config=OmegaConf.to_container(cfg.logger, resolve=True),
        init_from=cfg.get("init_from"),
        init_from_class_map=config.get("init_from_class_map"),
        map_images=build_map_images(cfg),
    )


def open_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """What the holder of the run directory's lock writes first: Hydra's record of the run in .hydra/ (config.yaml,
    hydra.yaml, overrides.yaml: configs/train.yaml sets hydra.output_subdir null so that a refused second start
    writes nothing)."""
    record = {
        "config.yaml": cfg,
        "hydra.yaml": HydraConfig.instance().cfg,
        "overrides.yaml": OmegaConf.create(list(HydraConfig.get().overrides.task)),
    }
    for name, node in record.items():
        atomic_file(run_dir / ".hydra" / name, lambda tmp, node=node: OmegaConf.save(node, tmp))


def main_process() -> bool:
    """The process that writes a run's shared files (and holds its lock): RANK 0, or the only one."""
    return os.environ.get("RANK", "0") == "0"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train the run cfg composes, in run_dir; returns train()'s result (dit.training.train). The main process first
    removes the temporaries a killed write left there (never taken for results)."""
    if main_process():
        for path in remove_stale_temporaries(run_dir):
            print(f"{run_dir}: removed {path.relative_to(run_dir)}, left by an interrupted write", file=sys.stderr)
    return train(build_job(cfg, run_dir))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    if os.environ.get("SUBMITIT_EXECUTOR"):  # a job of hydra/launcher=slurm|local: one process per task
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for Accelerate
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )  # task k: cuda:k
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    # One writer per run directory: the main process (RANK 0) of the run holds the lock for the run's life.
    way_out = (
        "run it in another directory with hydra.sweep.dir=..." if multirun else "choose another: hydra.run.dir=..."
    )
    lock = RunLock(run_dir, enabled=main_process(), way_out=way_out)
    try:
        lock.acquire()
    except RunDirBusy as e:  # refused before writing anything there (not even the failure note)
        if multirun:
            raise RunFailed(str(e)) from None
        sys.exit(f"error: {e}")
    with lock:
        attempt(cfg, run_dir, multirun, holder=lock.enabled)


def attempt(cfg: DictConfig, run_dir: Path, multirun: bool, holder: bool) -> None:
    """Train (the lock's holder opens the run directory first), turning the ways a run stops into one line (and the
    run directory's error.txt)."""
    try:
        if holder:
            open_run_dir(cfg, run_dir)
        run(cfg, run_dir)
    except Stopped as e:  # a stop signal: checkpoint written; submitit's requeue (if any), then exit EXIT_STOPPED
        note_failure(run_dir, str(e))
        print(f"{run_dir}: {e}", file=sys.stderr)
        e.hand_over()
    except (
        ValueError,
        OSError,
        FloatingPointError,
        LostProcess,
    ) as e:  # OSError: e.g. disk full while saving a checkpoint
        note_failure(run_dir, f"{type(e).__name__}: {e}")
        if multirun:
            # An exception, not an exit: Hydra marks this job failed and the sweep's other jobs go on
            # (SystemExit would end a multirun, the pool launcher's workers included, at the first error).
            raise RunFailed(f"{run_dir}: {e}") from None
        sys.exit(f"error: {e}")
    except BaseException as e:  # a bug, Ctrl-C, a launcher's timeout signal: noted for the report, then raised
        note_failure(run_dir, f"{type(e).__name__}: {e}".rstrip(": "))
        raise
    (run_dir / FAILURE_NOTE).unlink(missing_ok=True)  # an earlier attempt's note no longer applies


if __name__ == "__main__":
    main()
