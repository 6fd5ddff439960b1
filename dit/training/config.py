"""The training and optimiser settings: one dataclass each, registered as Hydra's structured-config
schema of the ``training`` and ``optim`` groups, so the yaml files, the command line and the loop
cannot drift (an unknown key or a wrong type is an error when the config is composed).

configs/training/default.yaml and configs/optim/adamw.yaml start from these schemas and list only
what they change; ``python train.py --cfg job`` prints every key with its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dit.data.fashion_mnist import ROOT as FASHION_MNIST_ROOT
from dit.diffusion import OBJECTIVES, SamplingSettings, sampler_name
from dit.models import DIT_MODELS, config_name
from dit.models.config import ADDED_WITH_SCHEMA, RUNTIME, DiTConfig
from dit.models.routing import TokenRouting
from dit.models.sizes import zoo_size
from dit.phema import sigma_rel_to_gamma
from dit.sampling import SampleConfig
from dit.training.addons.repa import REPAConfig
from dit.training.optim import OPTIMIZERS

__all__ = [
    "SAMPLING_PURPOSES",
    "OptimConfig",
    "TrainConfig",
    "check_settings",
    "register_configs",
    "training_sampler",
    "training_sampling",
]


class Choice(str, Enum):
    """A closed choice: Hydra checks it when the config is composed (one line naming the valid values); it is its
    value wherever it is compared, saved or interpolated (``hydra.sweep.subdir=${training.mixed_precision}``)."""

    def __str__(self) -> str:
        return self.value


OptimizerName = Choice("OptimizerName", [(n, n) for n in OPTIMIZERS])  # the names in OPTIMIZERS


class Decay(Choice):  # the learning rate after warm-up, to min_lr_ratio * lr at total_steps (optim.lr_at)
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class MuonScaling(Choice):  # torch.optim.Muon's adjust_lr_fn
    match_rms_adamw = "match_rms_adamw"  # Moonshot's: AdamW's update RMS, so lr and weight_decay serve both
    original = "original"  # Keller Jordan's


class Precision(Choice):  # Accelerate's mixed_precision
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class NanPolicy(Choice):  # what a non-finite loss does
    stop = "stop"
    skip = "skip"  # the step
    rollback = "rollback"  # to the last checkpoint, skipping the global batches from there to the bad one


class LowDisk(Choice):  # free space below the last checkpoint's size before a checkpoint is written
    warn = "warn"  # and write it (it may fail: one line, the earlier checkpoints kept)
    stop = "stop"  # cleanly, before writing: one line, exit non-zero, the earlier checkpoints kept


def runtime(default, added: bool = False):
    """A setting that changes how a run computes, not what: left out of the settings digest (a finished run is not
    trained again for it). added: also added after runs were recorded (ADDED_WITH_SCHEMA)."""
    return field(default=default, metadata={**RUNTIME, **(ADDED_WITH_SCHEMA if added else {})})


@dataclass
class OptimConfig:
    name: OptimizerName = field(default="adamw", metadata=ADDED_WITH_SCHEMA)
    lr: float = 1e-4  # DiT: constant 1e-4, no weight decay
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0
    decay: Decay = "constant"  # after warm-up, to min_lr_ratio * lr at total_steps
    min_lr_ratio: float = 0.0
    # optim=muon (configs/optim/muon.yaml): Muon's momentum, Newton-Schulz steps, and update scaling
    muon_momentum: float = field(default=0.95, metadata=ADDED_WITH_SCHEMA)
    muon_ns_steps: int = field(default=5, metadata=ADDED_WITH_SCHEMA)
    muon_adjust_lr: MuonScaling = field(default="match_rms_adamw", metadata=ADDED_WITH_SCHEMA)


@dataclass
class TrainConfig:
    # The DiT paper's recipe (ImageNet 256: 400K steps at global batch 256, EMA 0.9999).
    total_steps: int = 400_000
    global_batch_size: int = 256  # = per-device batch x processes x grad_accum (checked at start)
    grad_accum: int = 1
    mixed_precision: Precision = "no"
    max_grad_norm: float = 0.0  # 0: no clipping
    # torch.autograd's anomaly mode: a backward that makes a NaN names the forward op it came from (slow: debugging)
    detect_anomaly: bool = runtime(False)
    gradient_checkpointing: bool = runtime(False)
    compile: bool = runtime(False)  # torch.compile the model
    tf32: bool = True  # TF32 matmuls on GPU
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # min(decay, (1+n)/(10+n)): for short runs
    # EDM2's post-hoc EMA: power-function profiles of these relative widths tracked beside the EMA (EDM2: [0.05, 0.10]),
    # all of them saved every phema_snapshot_every steps (and at the last) to run_dir/phema/; `python -m dit.phema`
    # then reconstructs the EMA of any width at any snapshot's step. () = off.
    phema_sigma_rels: tuple[float, ...] = runtime((), added=True)
    phema_snapshot_every: int = runtime(0, added=True)
    # What a non-finite loss does (rollback: at most rollback_retries times, then stop naming the batches).
    nan_policy: NanPolicy = "stop"
    rollback_retries: int = field(default=3, metadata=ADDED_WITH_SCHEMA)
    log_every: int = runtime(100)
    ckpt_every: int = runtime(50_000)
    # Also a checkpoint when this many minutes have passed since the last one (0: only every ckpt_every steps),
    # decided alike on every process. On SIGTERM/SIGINT/SIGUSR1/SIGUSR2 a run saves and exits (preemption.py).
    ckpt_every_minutes: float = runtime(0.0, added=True)
    # Seconds a collective may wait for the other processes (the process group's timeout) before this process
    # stops with an error naming the lost process; null: torch's default (30 minutes). Longer than any
    # evaluation the main process runs alone while the others wait.
    collective_timeout_s: float | None = runtime(None, added=True)
    keep_last: int = runtime(3)
    low_disk: LowDisk = runtime("warn", added=True)  # less free space than the last checkpoint's size: warn or stop
    # EMA sample grids, one row per class: every sample_every steps (0: only at the end).
    sample_every: int = 10_000
    sample_per_class: int = 8
    sample_max_classes: int = 10
    # sampler null: the objective's default_sampler (ddpm for DDPM models, euler for flow models)
    grid_sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(sampler=None, steps=100, cfg_scale=1.5)
    )
    # FID of EMA samples every fid_every steps and at the last step (fid_every 0: never), logged and
    # plotted (fid.png); fid_final_samples (null: fid_samples) samples at the last step, e.g. a cheap FID
    # for the curves and a larger one for the result. Each record says how many samples it used (fid_n).
    fid_every: int = 0
    fid_samples: int = 500
    fid_final_samples: int | None = None
    fid_metric: str = "inception"  # inception | fashion_mnist (domain features, see dit.eval.domain)
    fid_ref: str | None = None  # stats npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), images, or a dataset name
    # sampler null: the objective's eval_sampler (ddim for DDPM models, euler for flow models)
    fid_sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(steps=25, cfg_scale=1.0))
    inception_weights: str | None = runtime(None)  # weights-inception-2015-12-05-6726825d.pth (default: torch hub's)
    domain_classifier: str | None = runtime(None)  # fid_metric fashion_mnist: another classifier file (default: ours)
    # model.cond_map (a spatial condition): the split of data.dataset whose images' maps and labels condition the
    # evaluation samples (the first fid_samples of them, in order) and the sample grids
    map_split: str = field(default="test", metadata=ADDED_WITH_SCHEMA)
    num_workers: int = runtime(4)
    # Training add-ons (dit/training/addons/; off by default; added after the committed studies: ADDED_WITH_SCHEMA).
    # TREAD token routing (dit/models/routing.py): a share of the image tokens skips blocks [start, end); ratio 0: off.
    token_routing: TokenRouting = field(default_factory=TokenRouting, metadata=ADDED_WITH_SCHEMA)
    # REPA (dit/training/addons/repa.py): align block `block`'s tokens with a frozen encoder's patch features;
    # weight 0: off.
    repa: REPAConfig = field(default_factory=REPAConfig, metadata=ADDED_WITH_SCHEMA)


def check_settings(cfg: TrainConfig, world_size: int) -> int:
    """Clear errors before anything starts (the closed choices were checked at composition); returns the
    per-process batch size."""
    if cfg.ckpt_every_minutes < 0 or (cfg.collective_timeout_s is not None and cfg.collective_timeout_s <= 0):
        raise ValueError("training.ckpt_every_minutes must be >= 0 and training.collective_timeout_s > 0 (or null)")
    if cfg.fid_final_samples is not None and cfg.fid_final_samples < cfg.fid_samples:
        raise ValueError(
            f"training.fid_final_samples={cfg.fid_final_samples} < training.fid_samples={cfg.fid_samples}; "
            "use more or null"
        )
    if cfg.grad_accum < 1 or cfg.global_batch_size < 1:
        raise ValueError("training.global_batch_size and training.grad_accum must be >= 1")
    for sigma_rel in cfg.phema_sigma_rels:
        try:
            sigma_rel_to_gamma(sigma_rel)
        except ValueError as e:
            raise ValueError(f"training.phema_sigma_rels: {e}") from None
    if bool(cfg.phema_sigma_rels) != (cfg.phema_snapshot_every > 0):
        raise ValueError(
            f"training.phema_sigma_rels={list(cfg.phema_sigma_rels)} and training.phema_snapshot_every="
            f"{cfg.phema_snapshot_every}: set both (profiles and a snapshot cadence in steps) or neither"
        )
    per_step = world_size * cfg.grad_accum
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={cfg.global_batch_size} is not divisible by processes ({world_size}) x "
            f"grad_accum ({cfg.grad_accum}) = {per_step}"
        )
    return cfg.global_batch_size // per_step


# What the samples of each of TrainConfig's sampling settings are for: a null `sampler` means the objective's sampler
# for that purpose (dit.diffusion.sampler_name: "default" as sample.py, "eval" for the in-training FID).
SAMPLING_PURPOSES = {"grid_sampling": "default", "fid_sampling": "eval"}


def training_sampler(key: str, sampler: str | None, objective: str) -> str:
    """The sampler training.<key> uses for a run with the objective named ``objective`` (sampler_name's rule). The
    loop builds it; the settings digest records it."""
    return sampler_name(sampler, OBJECTIVES[objective], SAMPLING_PURPOSES[key])


def training_sampling(key: str, settings, objective: str) -> SamplingSettings:
    """training.<key> (SamplingSettings, a config node or a run's recorded dict) as a run with the objective named
    ``objective`` samples: its sampler resolved (training_sampler). For the loop and for studies that redraw a
    run's samples."""
    settings = SamplingSettings.from_config(settings)
    return replace(settings, sampler=training_sampler(key, settings.sampler, objective))


def register_configs() -> None:
    """Make the dataclasses the schemas of configs/training/, configs/optim/, configs/model/ (``defaults:
    [schema]``) and configs/sample.yaml, and register the ``dit.*`` resolvers the configs use. The entry points that
    compose configs call it (train.py, sample.py, the tests, dit.analysis); idempotent."""
    cs = ConfigStore.instance()
    cs.store(name="sample_schema", node=SampleConfig)  # configs/sample.yaml: defaults [sample_schema]
    cs.store(group="training", name="schema", node=TrainConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="model", name="schema", node=ModelSchema)
    # model=dit_xl2 = model=dit model.size=XL/2 (the spelling of the per-size files), its sizes written out (from
    # sizes.py) so that `--cfg job` shows them without --resolve
    for name, sizes in DIT_MODELS.items():
        node = {"defaults": ["dit", "_self_"], "size": name[4:], "name": name, **sizes}
        cs.store(group="model", name=config_name(name), node=node)
    resolvers = {
        "dit.size": size_field,
        "dit.config_name": lambda name: config_name(name) if name else "dit",
        "dit.fashion_mnist_root": lambda: FASHION_MNIST_ROOT,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


@dataclass
class ModelSchema(DiTConfig):
    """configs/model/dit.yaml's schema: DiTConfig's fields, plus the target Hydra builds."""

    _target_: str = "dit.models.DiT"

    def __post_init__(self) -> None:  # a schema, not a model: values are checked by type here, built later
        pass


def size_field(size: str | None, key: str):
    """${dit.size:XL/2,depth} -> 28 (from dit/models/sizes.py); a null size leaves the field to the user."""
    if size is None:
        return None
    return "DiT-" + size if key == "name" else zoo_size(size)[key]
