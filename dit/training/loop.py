"""The training loop: setup, data, model/EMA, prepare, resume, loop (step, log, sample, checkpoint).

Called by train.py with built objects and plain settings; it never sees a Hydra config.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dit.data import GlobalBatchSampler
from dit.diffusion import GaussianDiffusion, create_diffusion
from dit.models import DiT
from dit.sampling import generate, save_grid
from dit.training.checkpointing import all_processes, find_resume, load_checkpoint, save_checkpoint
from dit.training.ema import EMA
from dit.training.logging import MetricsLogger
from dit.training.randomness import SlicedRandom


@dataclass
class OptimConfig:
    lr: float = 1e-4  # DiT: constant 1e-4, no weight decay
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0
    decay: str = "constant"  # constant | cosine | linear, after warm-up, to min_lr_ratio * lr at total_steps
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    total_steps: int = 400_000
    global_batch_size: int = 256  # = per-device batch x processes x grad_accum
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    max_grad_norm: float = 0.0  # 0: no clipping
    gradient_checkpointing: bool = False
    compile: bool = False
    tf32: bool = True  # on GPU
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 3
    sample_every: int = 10_000  # EMA sample grid; 0: only at the end
    sample_steps: int = 100
    sample_sampler: str = "ddpm"  # ddpm | ddim (eta 0)
    sample_cfg_scale: float = 1.5
    sample_per_class: int = 8
    sample_max_classes: int = 10
    fid_every: int = 0  # FID of EMA samples every N steps (0: never), logged and plotted like the loss
    fid_samples: int = 500
    fid_metric: str = "inception"  # inception | fashion_mnist (domain features, see dit.eval.domain)
    fid_ref: str | None = None  # reference: stats npz, image folder/npz or dataset name (e.g. fashion_mnist)
    fid_steps: int = 25  # DDIM steps for the FID samples
    fid_cfg_scale: float = 1.0
    inception_weights: str | None = None
    num_workers: int = 2
    seed: int = 0
    logger: dict = field(default_factory=lambda: {"wandb": {"mode": "disabled"}})  # the composed logger/ group


def lr_at(step: int, total_steps: int, o: OptimConfig) -> float:
    """Learning rate after `step` optimiser steps: warm-up, then constant / cosine / linear decay."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def check_settings(t: TrainConfig, o: OptimConfig, world_size: int) -> int:
    """Clear errors before anything starts; returns the per-device batch size."""
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"training.mixed_precision={t.mixed_precision!r}; valid: no, bf16, fp16")
    if t.nan_policy not in ("stop", "skip"):
        raise ValueError(f"training.nan_policy={t.nan_policy!r}; valid: stop, skip")
    if o.decay not in ("constant", "cosine", "linear"):
        raise ValueError(f"optim.decay={o.decay!r}; valid: constant, cosine, linear")
    if t.grad_accum < 1 or t.global_batch_size < 1:
        raise ValueError("training.global_batch_size and training.grad_accum must be >= 1")
    per_step = world_size * t.grad_accum
    if t.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by processes ({world_size}) x "
            f"grad_accum ({t.grad_accum}) = {per_step}"
        )
    return t.global_batch_size // per_step


def train(
    model: DiT,
    dataset,
    diffusion: GaussianDiffusion,
    run_dir: str | Path,
    t: TrainConfig,
    o: OptimConfig,
    resume: str | None = None,
    config: dict | None = None,
    data_meta: dict | None = None,
    vae=None,
) -> dict:
    """Train; returns {"step", "checkpoint", "export"}. Every process calls it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # --- setup -----------------------------------------------------------------------------
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    batch_size = check_settings(t, o, world)
    run_dir = Path(run_dir)
    if device.type == "cuda" and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(t.seed + rank)  # per-rank seeds; the step randomness itself comes from SlicedRandom
    if diffusion.variance_type == "learned_range" and not model.learn_sigma:
        raise ValueError("diffusion.variance_type=learned_range needs model.learn_sigma=true")
    resume_from = find_resume(resume, run_dir)  # before anything is written

    # --- data ------------------------------------------------------------------------------
    sampler = GlobalBatchSampler(len(dataset), batch_size, world, rank, t.grad_accum, t.seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=t.num_workers, pin_memory=device.type == "cuda", persistent_workers=t.num_workers > 0
    )

    # --- model, EMA, optimiser -------------------------------------------------------------
    model.gradient_checkpointing = t.gradient_checkpointing
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    model.train()
    if t.compile:
        model.compile()  # in place: parameter and state-dict names stay those of the DiT
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(device)
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)  # the DiT itself (its parameters are the live ones)
    null_drop = raw.y_embedder.dropout_prob if raw.y_embedder.has_null_class else 0.0

    # --- resume ----------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batch": 0}
    if resume_from is not None:
        state = load_checkpoint(accelerator, model, ema, resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    ema.shard_like(raw)  # under FSDP each process keeps its shard of the EMA
    sampler.set_position(state["epoch"], state["batch"])
    step = state["step"]
    logger = MetricsLogger(run_dir, accelerator.is_main_process, t.logger.get("wandb"), config or {}, step if resume_from else None)
    sample_diffusion = create_diffusion(str(t.sample_steps), variance_type=diffusion.variance_type)
    n_classes = min(raw.num_classes, t.sample_max_classes)
    sample_labels = torch.arange(n_classes).repeat_interleave(t.sample_per_class)

    def write_samples(at_step: int) -> None:
        """EMA sample grid (one row per class) -> run_dir/samples/step_*.png and latest.png."""
        ema.sync()
        if accelerator.is_main_process:
            images = torch.cat(
                [
                    imgs
                    for _, imgs in generate(
                        ema.model,
                        sample_diffusion,
                        sample_labels,
                        batch_size=len(sample_labels),
                        seed=t.seed,
                        cfg_scale=t.sample_cfg_scale if null_drop > 0 else 1.0,
                        sampler=t.sample_sampler,
                        vae=vae,
                        device=device,
                    )
                ]
            )
            path = run_dir / "samples" / f"step_{at_step:07d}.png"
            save_grid(images, nrow=t.sample_per_class, path=path)
            save_grid(images, nrow=t.sample_per_class, path=run_dir / "samples" / "latest.png")
            logger.log_image(at_step, "samples", path)
            logger.plot()
        accelerator.wait_for_everyone()

    fid_extractor = fid_reference = None
    if t.fid_every and accelerator.is_main_process:
        from dit.eval import ImageSource, Stats, extract_features, make_extractor, stats_from_features
        from dit.eval.stats import is_stats_file

        if not t.fid_ref:
            raise ValueError("training.fid_every > 0 needs training.fid_ref (a stats npz, images, or a dataset name)")
        fid_extractor = make_extractor(t.fid_metric, t.inception_weights, device)
        cached = run_dir / f"fid_ref_{t.fid_metric}.npz"
        if cached.exists():
            fid_reference = Stats.load(cached, fid_extractor.name)
        elif is_stats_file(t.fid_ref):
            fid_reference = Stats.load(t.fid_ref, fid_extractor.name)
        else:
            fid_reference = stats_from_features(extract_features(ImageSource(t.fid_ref), fid_extractor, 250, device)[0], fid_extractor.name)
            run_dir.mkdir(parents=True, exist_ok=True)
            fid_reference.save(cached)
    fid_diffusion = create_diffusion(str(t.fid_steps), variance_type=diffusion.variance_type)

    def evaluate(at_step: int) -> None:
        """FID (and class consistency for the domain metric) of fid_samples EMA samples."""
        ema.sync()
        if accelerator.is_main_process:
            from dit.eval import fid, stats_from_features

            labels = torch.arange(t.fid_samples) % raw.num_classes
            images = torch.cat(
                [
                    imgs
                    for _, imgs in generate(
                        ema.model,
                        fid_diffusion,
                        labels,
                        batch_size=250,
                        seed=t.seed + 1,
                        sampler="ddim",
                        cfg_scale=t.fid_cfg_scale if null_drop > 0 else 1.0,
                        vae=vae,
                        device=device,
                    )
                ]
            )
            x = images.permute(0, 3, 1, 2)
            feats, logits = zip(*(fid_extractor(x[i : i + 250].to(device)) for i in range(0, len(x), 250)))
            feats, logits = torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu()
            metrics = {"fid": fid(stats_from_features(feats, fid_extractor.name), fid_reference)}
            if t.fid_metric == "fashion_mnist":
                metrics["class_consistency"] = (logits.argmax(1) == labels).float().mean().item()
            logger.log(at_step, metrics)
            logger.plot()
        accelerator.wait_for_everyone()

    def checkpoint(at_step: int) -> Path:
        pos = {"epoch": state["epoch"], "batch": state["batch"], "ema_num_updates": ema.num_updates}
        return save_checkpoint(accelerator, model, ema, run_dir, at_step, pos, data_meta or {}, t.keep_last)

    # --- loop ------------------------------------------------------------------------------
    batches = iter(loader)
    window = torch.zeros(4, device=device)  # loss, mse, vb sums and count over the log window
    skipped, tic, tic_step = 0, time.perf_counter(), step
    bar = tqdm(total=t.total_steps, initial=step, unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_ckpt = None
    while step < t.total_steps:
        lr = lr_at(step, t.total_steps, o)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_terms = torch.zeros(4, device=device)  # this step's loss, mse, vb sums and micro-batch count
        for micro in range(t.grad_accum):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            rng = SlicedRandom(t.seed, step, micro, world, rank, device)
            x = dataset.batch_transform(x, rng)
            timesteps = rng.randint(diffusion.num_timesteps, len(x))
            noise = rng.randn(x.shape)
            kwargs = {"y": y}
            if null_drop > 0:
                kwargs["force_drop_ids"] = (rng.rand(len(x)) < null_drop).long()
            sync = micro == t.grad_accum - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                with accelerator.autocast():
                    terms = diffusion.training_losses(model, x, timesteps, kwargs, noise=noise)
                loss = terms["loss"].mean()
                accelerator.backward(loss / t.grad_accum)
            step_terms += torch.stack(
                [
                    loss.detach(),
                    terms["mse"].mean().detach(),
                    terms.get("vb", torch.zeros_like(terms["mse"])).mean().detach(),
                    torch.ones((), device=device),
                ]
            )
        # One decision per step, alike on every rank, taken after the backward passes: the host waits for
        # the device once per step, never between a forward and its backward.
        if not all_processes(accelerator, torch.isfinite(step_terms).all()):
            if t.nan_policy == "stop":
                bar.close()
                raise FloatingPointError(f"non-finite loss at step {step}; stopping (training.nan_policy=skip skips such steps)")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)  # the non-finite gradients never reach the weights
            _advance(state, sampler)
            step += 1
            bar.update(1)
            continue
        window += step_terms
        # model.parameters() after prepare: FSDP2 replaces the parameters with sharded ones.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(raw)
        _advance(state, sampler)
        step += 1
        bar.update(1)

        if step % t.log_every == 0 or step == t.total_steps:
            totals = accelerator.reduce(window, "sum")  # averaged over processes and the window
            count = max(totals[3].item(), 1.0)
            elapsed = time.perf_counter() - tic
            steps_per_s = (step - tic_step) / max(elapsed, 1e-9)
            metrics = {
                "loss": totals[0].item() / count,
                "mse": totals[1].item() / count,
                "vb": totals[2].item() / count,
                "lr": lr,
                "steps_per_s": steps_per_s,
                "images_per_s": steps_per_s * t.global_batch_size,
                "epoch": state["epoch"],
                "skipped_steps": skipped,
            }
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{steps_per_s:.2f}")
            window.zero_()
            tic, tic_step = time.perf_counter(), step
        if t.sample_every and step % t.sample_every == 0 and step < t.total_steps:
            write_samples(step)
        if t.fid_every and step % t.fid_every == 0:
            evaluate(step)
        if t.ckpt_every and step % t.ckpt_every == 0 and step < t.total_steps:
            last_ckpt = checkpoint(step)
    bar.close()

    # --- end: checkpoint, samples, EMA export -------------------------------------------------
    last_ckpt = checkpoint(step)
    write_samples(step)
    export = run_dir / "model"
    weights, ema_weights = accelerator.get_state_dict(model), ema.sync()  # collective: full weights under FSDP
    if accelerator.is_main_process:
        from dit.checkpoints import save_export

        save_export(export, raw, ema=ema_weights, data=data_meta, state_dict=weights)
        logger.plot()
        logger.finish()
        print(f"done: step {step}; checkpoint {last_ckpt}; EMA export {export}; samples {run_dir / 'samples' / 'latest.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "checkpoint": last_ckpt, "export": export, "ema": ema.model, "model": raw}


def _advance(state: dict, sampler: GlobalBatchSampler) -> None:
    """Move the data position past the global batch just used (including a skipped one)."""
    state["batch"] += 1
    if state["batch"] == sampler.batches_per_epoch:
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
