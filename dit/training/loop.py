"""The training loop: setup, data, model/EMA, prepare, resume, loop (step, log, sample, checkpoint).

Called by train.py with built objects and plain settings; it never sees a Hydra config.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dit.data import GlobalBatchSampler
from dit.diffusion import Objective, build_sampler
from dit.models import DiT
from dit.sampling import generate, save_grid
from dit.training.checkpointing import all_processes, find_resume, load_checkpoint, main_process_says, save_checkpoint
from dit.training.config import OptimConfig, TrainConfig
from dit.training.ema import EMA
from dit.training.logging import (
    FINISHED,
    MetricsLogger,
    finished_info,
    mark_finished,
    settings_digest,
    trackers,
    tracking_config,
    unmark_finished,
)
from dit.training.randomness import SlicedRandom


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
    if t.fid_final_samples is not None and t.fid_final_samples < t.fid_samples:
        raise ValueError(f"training.fid_final_samples={t.fid_final_samples} < training.fid_samples={t.fid_samples}; use more or null")
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
    objective: Objective,
    run_dir: str | Path,
    t: TrainConfig,
    o: OptimConfig,
    resume: str | None = None,
    config: dict | None = None,
    data_meta: dict | None = None,
    vae=None,
    seed: int = 0,
    logger_config: dict | None = None,
) -> dict:
    """Train; returns {"step", "checkpoint", "export"}. Every process calls it.

    objective: what is optimised (dit.diffusion.build_objective); the loop never looks inside it.
    logger_config: the composed logger/ config group (trackers)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # --- setup -----------------------------------------------------------------------------
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, log_with=trackers(logger_config) or None, project_config=tracking_config(run_dir)
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    batch_size = check_settings(t, o, world)
    run_dir = Path(run_dir)
    if device.type == "cuda" and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(seed + rank)  # per-rank seeds; the step randomness itself comes from SlicedRandom
    objective.check_model(model)
    objective_settings = objective.settings()
    # Built once, used by every grid and FID evaluation; bad settings fail here, before any step.
    grid_sampler = _training_sampler(objective, t.grid_sampling, model, "training.grid_sampling")
    fid_sampler = _training_sampler(objective, t.fid_sampling, model, "training.fid_sampling") if t.fid_every else None
    resume_from = find_resume(resume, run_dir)  # before anything is written
    settings = settings_digest(config or {})

    def leave(message: str, result: dict) -> dict:
        """A finished run met again: nothing to train or rewrite."""
        accelerator.print(message, file=sys.stderr)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result

    if resume == "auto" and all_processes(accelerator, resume_from is None):
        # Results kept without checkpoints (a study committed to git): finished.json, which only the main
        # process writes, with the same total_steps and settings says the run is done.
        done = finished_info(run_dir) if accelerator.is_main_process else None
        if main_process_says(accelerator, done is not None and done["step"] == t.total_steps and done.get("settings") == settings):
            return leave(
                f"{run_dir}: already finished at step {t.total_steps} (results in metrics.jsonl; no checkpoint here); "
                f"delete {run_dir / FINISHED} to train it again",
                {
                    "step": t.total_steps,
                    "checkpoint": None,
                    "export": run_dir / "model" if (run_dir / "model" / "config.json").exists() else None,
                },
            )

    # --- data ------------------------------------------------------------------------------
    sampler = GlobalBatchSampler(len(dataset), batch_size, world, rank, t.grad_accum, seed)
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
        state = load_checkpoint(accelerator, model, ema, resume_from, objective_settings)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}", file=sys.stderr)
    ema.shard_like(raw)  # under FSDP each process keeps its shard of the EMA
    sampler.set_position(state["epoch"], state["batch"])
    step = state["step"]
    export = run_dir / "model"
    # Decided alike on every process (only the main one writes the export; the disks may differ).
    if all_processes(accelerator, step == t.total_steps and (export / "config.json").exists()):
        if accelerator.is_main_process and finished_info(run_dir) is None:  # finished before the record existed
            mark_finished(run_dir, step, settings, data_meta)
        message = f"{run_dir}: already finished at step {step}; EMA export in {export}"
        return leave(message, {"step": step, "checkpoint": resume_from, "export": export, "ema": ema.model, "model": raw})
    if accelerator.is_main_process:
        unmark_finished(run_dir)  # trained again (longer, afresh, other settings): the old record no longer holds
    logger = MetricsLogger(accelerator, run_dir, logger_config, config or {}, step if resume_from else None)
    n_classes = min(raw.num_classes, t.sample_max_classes)
    sample_labels = torch.arange(n_classes).repeat_interleave(t.sample_per_class)

    def write_samples(at_step: int) -> None:
        """EMA sample grid (one row per class) -> run_dir/samples/step_*.png and latest.png."""
        ema.sync()
        if accelerator.is_main_process:
            batches = generate(ema.model, grid_sampler, sample_labels, batch_size=len(sample_labels), seed=seed, vae=vae, device=device)
            images = torch.cat([imgs for _, imgs in batches])
            path = run_dir / "samples" / f"step_{at_step:07d}.png"
            save_grid(images, nrow=t.sample_per_class, path=path)
            save_grid(images, nrow=t.sample_per_class, path=run_dir / "samples" / "latest.png")
            logger.log_image(at_step, "samples", path)
            logger.plot()
        accelerator.wait_for_everyone()

    evaluator = None
    if t.fid_every and accelerator.is_main_process:
        from dit.eval.evaluator import Evaluator

        if not t.fid_ref:
            raise ValueError("training.fid_every > 0 needs training.fid_ref (a stats npz, images, or a dataset name)")
        cache = run_dir / f"fid_ref_{t.fid_metric}.npz"
        evaluator = Evaluator(
            t.fid_metric, t.fid_ref, t.inception_weights, device, 250, cache, distributed=False, domain_classifier=t.domain_classifier
        )
        evaluator.reference()  # computed (or read from the run's cache) once, before training

    def evaluate(at_step: int) -> None:
        """FID (and what else the metric reports) of fid_samples EMA samples (fid_final_samples at the end)."""
        ema.sync()
        if accelerator.is_main_process:
            n = t.fid_final_samples if at_step == t.total_steps and t.fid_final_samples else t.fid_samples
            labels = torch.arange(n) % raw.num_classes
            batches = generate(ema.model, fid_sampler, labels, batch_size=250, seed=seed + 1, vae=vae, device=device)
            images = torch.cat([imgs for _, imgs in batches])
            final = n > t.fid_samples
            measured = {"fid_extractor": evaluator.extractor.name}  # what measured it (the feature network, its hash)
            if final:  # the curve's point at this step, from fid_samples of them (FID depends on the count)
                m = t.fid_samples
                logger.log(at_step, evaluator.evaluate(images[:m], labels[:m]) | {"fid_n": m} | measured)
            logger.log(at_step, evaluator.evaluate(images, labels) | {"fid_n": n} | measured, tracker_prefix="final/" if final else "")
            logger.plot()
        accelerator.wait_for_everyone()

    def checkpoint(at_step: int) -> Path:
        pos = {"epoch": state["epoch"], "batch": state["batch"], "ema_num_updates": ema.num_updates}
        return save_checkpoint(accelerator, model, ema, run_dir, at_step, pos, data_meta or {}, t.keep_last, objective_settings)

    # --- loop ------------------------------------------------------------------------------
    batches = iter(loader)
    terms_logged = objective.loss_terms  # e.g. ("loss", "mse", "vb"): what the objective reports per sample
    window = torch.zeros(len(terms_logged) + 1, device=device)  # sums of each term and the count over the log window
    skipped, tic, tic_step = 0, time.perf_counter(), step
    bar = tqdm(total=t.total_steps, initial=step, unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_ckpt = None
    while step < t.total_steps:
        lr = lr_at(step, t.total_steps, o)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_terms = torch.zeros_like(window)  # this step's term sums and micro-batch count
        for micro in range(t.grad_accum):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            rng = SlicedRandom(seed, step, micro, world, rank, device)
            x = dataset.batch_transform(x, rng)
            draw = objective.draw(rng, x)  # timesteps, noise: before the label drops, in this order
            kwargs = {"y": y}
            if null_drop > 0:
                kwargs["force_drop_ids"] = (rng.rand(len(x)) < null_drop).long()
            sync = micro == t.grad_accum - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                with accelerator.autocast():
                    terms = objective.losses(model, x, draw, kwargs)
                loss = terms["loss"].mean()
                accelerator.backward(loss / t.grad_accum)
            step_terms += torch.stack([terms[k].mean().detach() for k in terms_logged] + [torch.ones((), device=device)])
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
            count = max(totals[-1].item(), 1.0)
            elapsed = time.perf_counter() - tic
            steps_per_s = (step - tic_step) / max(elapsed, 1e-9)
            metrics = {k: totals[i].item() / count for i, k in enumerate(terms_logged)}
            metrics |= {
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
        if t.fid_every and (step % t.fid_every == 0 or step == t.total_steps):
            evaluate(step)
        if t.ckpt_every and step % t.ckpt_every == 0 and step < t.total_steps:
            last_ckpt = checkpoint(step)
    bar.close()

    # --- end: checkpoint, samples, EMA export -------------------------------------------------
    last_ckpt = checkpoint(step)
    write_samples(step)
    weights, ema_weights = accelerator.get_state_dict(model), ema.sync()  # collective: full weights under FSDP
    if accelerator.is_main_process:
        from dit.checkpoints import save_export

        save_export(export, raw, ema=ema_weights, data=data_meta, state_dict=weights, objective=objective_settings)
        mark_finished(run_dir, step, settings, data_meta)
        logger.plot()  # accelerator.end_training() below closes the trackers
        print(f"done: step {step}; checkpoint {last_ckpt}; EMA export {export}; samples {run_dir / 'samples' / 'latest.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "checkpoint": last_ckpt, "export": export, "ema": ema.model, "model": raw}


def _training_sampler(objective: Objective, settings, model, key: str):
    """build_sampler + the model check, with errors that name the config key they come from."""
    try:
        sampler = build_sampler(objective, settings)
        sampler.check_model(model)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    return sampler


def _advance(state: dict, sampler: GlobalBatchSampler) -> None:
    """Move the data position past the global batch just used (including a skipped one)."""
    state["batch"] += 1
    if state["batch"] == sampler.batches_per_epoch:
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
