"""The training loop as a Trainer (torchtitan's split): setup, train_step, evaluate, checkpoint, finish.

Called by train.py (through `train`) with built objects and plain settings; it never sees a Hydra config.
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

from dit.data import GlobalBatchSampler, to_device, with_images
from dit.diffusion import Objective, build_sampler
from dit.integrity import read_json
from dit.models import DiT
from dit.models.spatial import map_images, map_iou
from dit.sampling import generate, save_grid
from dit.training.checkpointing import all_processes, find_resume, load_checkpoint, main_process_says, save_checkpoint
from dit.training.config import OptimConfig, TrainConfig, training_sampling
from dit.training.ema import EMA
from dit.training.logging import MetricsLogger, trackers, tracking_config
from dit.training.optim import build_optimizer, optimizer_flops
from dit.training.preemption import CheckpointClock, Control, Stopped, StopRequest
from dit.training.randomness import SlicedRandom
from dit.training.repa import REPAModel, build_teacher, dit_weights, repa_loss, teacher_tokens
from dit.training.run import FINISHED, finished_info, mark_finished, settings_digest, unmark_finished
from dit.zoo import training_flops

EVAL_BATCH_SIZE = 250  # images per generate() batch in FID evaluations


def eval_inputs(n: int, num_classes: int, seed: int) -> dict:
    """What an FID evaluation of n samples draws: generate()'s labels, seed and batch size. The one place these
    are decided; studies that redraw a run's evaluation samples (studies/ablation_conditioning/per_class.py) call
    it."""
    return {"labels": torch.arange(n) % num_classes, "seed": seed + 1, "batch_size": EVAL_BATCH_SIZE}


def lr_at(step: int, total_steps: int, o: OptimConfig) -> float:
    """Learning rate after `step` optimiser steps: warm-up, then constant / cosine / linear decay."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def check_settings(cfg: TrainConfig, o: OptimConfig, world_size: int) -> int:
    """Clear errors before anything starts; returns the per-device batch size."""
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"training.mixed_precision={cfg.mixed_precision!r}; valid: no, bf16, fp16")
    if cfg.nan_policy not in ("stop", "skip", "rollback"):
        raise ValueError(f"training.nan_policy={cfg.nan_policy!r}; valid: stop, skip, rollback")
    if cfg.ckpt_every_minutes < 0 or (cfg.collective_timeout_s is not None and cfg.collective_timeout_s <= 0):
        raise ValueError("training.ckpt_every_minutes must be >= 0 and training.collective_timeout_s > 0 (or null)")
    if o.decay not in ("constant", "cosine", "linear"):
        raise ValueError(f"optim.decay={o.decay!r}; valid: constant, cosine, linear")
    if cfg.fid_final_samples is not None and cfg.fid_final_samples < cfg.fid_samples:
        raise ValueError(
            f"training.fid_final_samples={cfg.fid_final_samples} < training.fid_samples={cfg.fid_samples}; "
            "use more or null"
        )
    if cfg.grad_accum < 1 or cfg.global_batch_size < 1:
        raise ValueError("training.global_batch_size and training.grad_accum must be >= 1")
    per_step = world_size * cfg.grad_accum
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={cfg.global_batch_size} is not divisible by processes ({world_size}) x "
            f"grad_accum ({cfg.grad_accum}) = {per_step}"
        )
    return cfg.global_batch_size // per_step


def train(*args, **kwargs) -> dict:
    """Train; returns {"step", "checkpoint", "export"} (and "ema", "model" when it trained or was
    exported). Every process calls it. The arguments are the Trainer's.

    objective: what is optimised (dit.diffusion.build_objective); the loop never looks inside it.
    logger_config: the composed logger/ config group (trackers)."""
    return Trainer(*args, **kwargs).fit()


class Trainer:
    """One training run: `fit()` = setup, then train_step (with its logging, samples, evaluations and
    checkpoints) until cfg.total_steps, then finish. Every process builds one."""

    def __init__(
        self,
        model: DiT,
        dataset,
        objective: Objective,
        run_dir: str | Path,
        cfg: TrainConfig,
        o: OptimConfig,
        resume: str | None = None,
        config: dict | None = None,
        data_meta: dict | None = None,
        vae=None,
        seed: int = 0,
        logger_config: dict | None = None,
        init_from: str | None = None,
        init_from_class_map: list | None = None,
        map_images=None,
    ):
        """map_images: for a model with a spatial condition (model.cond_map), the held-out images (a dataset of
        (image, label)) whose maps and labels condition the evaluation samples and the grids (training.map_split)."""
        self.map_images = map_images
        self.model, self.dataset, self.objective, self.run_dir = model, dataset, objective, Path(run_dir)
        self.cfg, self.o, self.resume, self.config, self.data_meta = cfg, o, resume, config or {}, data_meta
        self.vae, self.seed, self.logger_config = vae, seed, logger_config
        self.init_from, self.init_from_class_map, self.init_record = init_from, init_from_class_map, None
        self.export = self.run_dir / "model"
        self.last_ckpt = None
        self.stop = StopRequest()  # SIGTERM, SIGINT, SIGUSR1, SIGUSR2: save at the step reached and exit
        self.pending: list[str] = []  # work of the checkpoint's step that a stop interrupted ("evaluate")

    def fit(self) -> dict:
        """Raises Stopped (after a checkpoint) on a stop signal, LostProcess when another process is gone."""
        with self.stop:
            done = self.setup()
            if done is not None:
                return done
            try:
                self._do_pending()
                self._train()
                return self.finish()
            except RuntimeError as e:
                if self.world > 1 and _collective_failure(e):
                    raise LostProcess(self._lost_message(e)) from e
                raise

    def _train(self) -> None:
        cfg = self.cfg
        while True:
            self._between_steps()
            if self.step >= cfg.total_steps:
                break
            tic = time.perf_counter()
            stepped = self.train_step()
            self.state["train_s"] += time.perf_counter() - tic  # training time, without samples, FID, checkpoints
            if stepped is None:  # a non-finite step skipped: no logging, samples, evaluation or checkpoint
                continue
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                self.log(*stepped)
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.total_steps:
                self.write_samples(self.step)
            if cfg.fid_every and (self.step % cfg.fid_every == 0 or self.step == cfg.total_steps):
                self.evaluate(self.step)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.total_steps:
                self.last_ckpt = self.checkpoint(self.step)
        self.bar.close()

    def _between_steps(self) -> None:
        """The one decision per step that every process takes alike: stop (a signal reached some process), save
        (training.ckpt_every_minutes passed on some process), and whether the checkpoint must record unfinished
        work. On a stop: a checkpoint at this step (unless one holds it already), the trackers closed, Stopped."""
        stop, due, pending = self.control.agree(self.stop.requested, self.clock.due(), bool(self.pending))
        if (stop or due) and (self.saved_step != self.step or pending):
            self.last_ckpt = self.checkpoint(self.step)
        if stop:
            self.bar.close()
            self.accelerator.end_training()  # flushes and closes the trackers
            raise Stopped(self.stop.signum, self.step, self.last_ckpt, self.stop.previous_handler())

    def _do_pending(self) -> None:
        """What the checkpoint's step left undone when it was stopped (its FID evaluation), before training on.
        Every process read the same list from the checkpoint."""
        if "evaluate" in self.pending and self.cfg.fid_every:
            self.pending = []
            self.evaluate(self.step)
            self.saved_step = None  # the checkpoint still lists it: a stop now saves this step again

    def _lost_message(self, e: RuntimeError) -> str:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"step {self.step}: another process of this run is gone or stopped answering ({first[:300]}); "
            f"this process stops too. Last checkpoint: {self.last_ckpt or 'none'}; resume=auto continues from it"
        )

    # --- setup -----------------------------------------------------------------------------
    def setup(self) -> dict | None:
        """Everything before the first step; returns the result instead when the run is already finished."""
        self._setup_accelerator()
        done = self._finished_without_checkpoint()
        if done is not None:
            return done
        self._init_weights()
        self._setup_data()
        self._setup_model()
        done = self._resume()
        if done is not None:
            return done
        self._setup_outputs()
        return None

    def _setup_accelerator(self) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        cfg, objective, model = self.cfg, self.objective, self.model
        timeout = cfg.collective_timeout_s
        # A run owns its process's Accelerate settings: a worker that runs sweep jobs one after another (the pool
        # launcher) still holds the previous job's, and Accelerate refuses a new mixed precision against them. The
        # process group (PartialState) stays: it belongs to the process, not to the run.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=trackers(self.logger_config) or None,
            project_config=tracking_config(self.run_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else None,
        )
        acc = self.accelerator
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.control, self.clock = Control(cfg.collective_timeout_s), CheckpointClock(cfg.ckpt_every_minutes)
        self.batch_size = check_settings(cfg, self.o, self.world)
        if self.device.type == "cuda":  # set either way: the previous job in this process may have turned it on
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
            if cfg.tf32:
                torch.backends.cudnn.allow_tf32 = True  # torch's default; only matmuls are fp32 unless asked
        set_seed(self.seed + self.rank)  # per-rank seeds; the step randomness itself comes from SlicedRandom
        objective.check_model(model)
        self.objective_settings = objective.settings()
        # Built once, used by every grid and FID evaluation; bad settings fail here, before any step.
        self.grid_sampler = _training_sampler(objective, cfg, "grid_sampling", model)
        fid = _training_sampler(objective, cfg, "fid_sampling", model) if cfg.fid_every else None
        self.fid_sampler = fid
        self.resume_from = find_resume(self.resume, self.run_dir)  # before anything is written
        self.settings = settings_digest(self.config)

    def _leave(self, message: str, result: dict) -> dict:
        """A finished run met again: nothing to train or rewrite."""
        self.accelerator.print(message, file=sys.stderr)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return result

    def _finished_without_checkpoint(self) -> dict | None:
        # Results kept without checkpoints (a study committed to git): finished.json, which only the main
        # process writes, with the same total_steps and settings says the run is done.
        acc, run_dir, total = self.accelerator, self.run_dir, self.cfg.total_steps
        if not (self.resume == "auto" and all_processes(acc, self.resume_from is None)):
            return None
        done = finished_info(run_dir) if acc.is_main_process else None
        same = done is not None and done["step"] == total and done.get("settings") == self.settings
        if not main_process_says(acc, same):
            return None
        export = self.export if (self.export / "config.json").exists() else None
        return self._leave(
            f"{run_dir}: already finished at step {total} (results in metrics.jsonl; no checkpoint here); "
            f"delete {run_dir / FINISHED} to train it again",
            {"step": total, "checkpoint": None, "export": export},
        )

    def _init_weights(self) -> None:
        """init_from: the source's weights into the model, before the EMA, the optimiser and the wrappers are built
        from it. A run that resumes reads its checkpoint instead and keeps the record the checkpoint holds."""
        if not self.init_from:
            return
        if self.resume_from is not None:
            self.init_record = read_json(Path(self.resume_from) / "config.json").get("init_from")
            return
        from dit.init_from import initialize

        done = initialize(self.model, self.init_from, self.init_from_class_map)
        self.init_record = done.record()
        self.accelerator.print(done.table(), file=sys.stderr)

    def _setup_data(self) -> None:
        cfg, device = self.cfg, self.device
        self.batch_sampler = GlobalBatchSampler(
            len(self.dataset), self.batch_size, self.world, self.rank, cfg.grad_accum, self.seed
        )
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    def _setup_model(self) -> None:
        cfg, o, model = self.cfg, self.o, self.model
        cfg.token_routing.check(model)  # before anything is built: a clear error for a model it cannot route
        cfg.repa.check(model, self.dataset, cfg.token_routing)
        if model.map_kind is not None:  # the maps are made from the images: pixels, and held-out ones to sample with
            if getattr(self.dataset, "latent", False):
                raise ValueError(
                    f"model.cond_map={model.map_kind.name} makes its maps from the training images; latent data "
                    "has none (use a pixel dataset)"
                )
            if self.map_images is None:
                raise ValueError(
                    f"model.cond_map={model.map_kind.name}: no held-out images to condition the samples with "
                    "(training.map_split)"
                )
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)  # of the DiT alone
        trained = model
        per_image = training_flops(model.config, cfg.token_routing)  # the DiT's forward and backward, with routing
        if cfg.repa.enabled:  # REPA: the DiT and its projector train together; the teacher is frozen
            self.teacher = build_teacher(cfg.repa, self.device)
            trained = REPAModel(model, cfg.repa, self.teacher.dim, self.seed)
            per_image += trained.flops_per_image(self.teacher)
        optimizer = build_optimizer(trained, o)
        # FLOPs of one optimiser step, counted once: the global batch through the DiT (and REPA's encoder and
        # projector), and the optimiser's matrix work on every process (Muon's Newton-Schulz)
        self.flops_per_step = per_image * cfg.global_batch_size + optimizer_flops(optimizer) * self.world
        trained.train()
        if cfg.compile:
            model.compile()  # in place: parameter and state-dict names stay those of the DiT
        self.model, self.optimizer = self.accelerator.prepare(trained, optimizer)
        self.ema.model.to(self.device)
        # The DiT itself (its parameters are the live ones).
        self.raw = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if cfg.repa.enabled:
            self.repa_model, self.raw = self.raw, self.raw.dit

    def _resume(self) -> dict | None:
        acc, run_dir = self.accelerator, self.run_dir
        self.state = {"step": 0, "epoch": 0, "batch": 0, "train_s": 0.0}
        self.saved_step = None  # the step of the checkpoint that holds the current weights, if any
        self.since = (None, {})  # (a checkpoint's step, the data position training went on from after it)
        if self.resume_from is not None:
            self.state = {"train_s": 0.0} | load_checkpoint(
                acc, self.model, self.ema, self.resume_from, self.objective_settings
            )
            self.saved_step, self.pending = self.state["step"], list(self.state.pop("pending", []))
            acc.print(f"resumed from {self.resume_from} at step {self.state['step']}", file=sys.stderr)
        self.ema.shard_like(self.raw)  # under FSDP each process keeps its shard of the EMA
        self.batch_sampler.set_position(self.state["epoch"], self.state["batch"])
        self.step = step = self.state["step"]
        # Decided alike on every process (only the main one writes the export; the disks may differ).
        if all_processes(acc, step == self.cfg.total_steps and (self.export / "config.json").exists()):
            if acc.is_main_process and finished_info(run_dir) is None:  # finished before the record existed
                mark_finished(run_dir, step, self.settings, self.data_meta)
            message = f"{run_dir}: already finished at step {step}; EMA export in {self.export}"
            return self._leave(message, self._result(self.resume_from))
        return None

    def _setup_outputs(self) -> None:
        acc, cfg, run_dir, device = self.accelerator, self.cfg, self.run_dir, self.device
        if acc.is_main_process:
            unmark_finished(run_dir)  # trained again (longer, afresh, other settings): the old record no longer holds
        resume_step = self.step if self.resume_from else None
        self.logger = MetricsLogger(acc, run_dir, self.logger_config, self.config, resume_step)
        n_classes = min(self.raw.num_classes, cfg.sample_max_classes)
        self.sample_labels = torch.arange(n_classes).repeat_interleave(cfg.sample_per_class)
        self.sample_maps = None
        if self.raw.map_kind is not None:  # each grid cell: the map of a held-out image of its row's class
            self.sample_maps = self._held_out_maps(self.sample_labels)
            if acc.is_main_process:
                save_grid(map_images(self.sample_maps, self.raw.input_size), cfg.sample_per_class,
                          run_dir / "samples" / "maps.png")  # fmt: skip
        self.evaluator = None
        if cfg.fid_every and acc.is_main_process:
            from dit.eval.evaluator import Evaluator

            if not cfg.fid_ref:
                raise ValueError(
                    "training.fid_every > 0 needs training.fid_ref (a stats npz, images, or a dataset name)"
                )
            cache = run_dir / f"fid_ref_{cfg.fid_metric}.npz"
            self.evaluator = Evaluator(
                cfg.fid_metric, cfg.fid_ref, cfg.inception_weights, device, EVAL_BATCH_SIZE, cache,
                distributed=False, domain_classifier=cfg.domain_classifier,
            )  # fmt: skip
            self.evaluator.reference()  # computed (or read from the run's cache) once, before training
        self.batches = iter(self.loader)
        self.terms_logged = self.objective.loss_terms  # e.g. ("loss", "mse", "vb"): what the objective reports
        if cfg.repa.enabled:
            self.terms_logged = (*self.terms_logged, "repa")
        # Sums of each term and the count over the log window.
        self.window = torch.zeros(len(self.terms_logged) + 1, device=device)
        self.skipped, self.tic, self.tic_step = 0, time.perf_counter(), self.step
        self.bar = tqdm(
            total=cfg.total_steps, initial=self.step, unit="step", disable=not acc.is_main_process, dynamic_ncols=True
        )

    # --- a step ----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, torch.Tensor | None] | None:
        """One optimiser step over grad_accum micro-batches; returns (lr, grad norm), or None when the
        step was skipped for a non-finite loss (training.nan_policy=skip)."""
        acc, cfg, step = self.accelerator, self.cfg, self.step
        lr = lr_at(step, cfg.total_steps, self.o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_terms = torch.zeros_like(self.window)  # this step's term sums and micro-batch count
        for micro in range(cfg.grad_accum):
            step_terms += self._micro_step(micro, sync=micro == cfg.grad_accum - 1)
        # One decision per step, alike on every rank, taken after the backward passes: the host waits for
        # the device once per step, never between a forward and its backward.
        if not all_processes(acc, torch.isfinite(step_terms).all()):
            if cfg.nan_policy == "stop":
                self.bar.close()
                raise FloatingPointError(
                    f"non-finite loss at step {step} (global batch {self._position()}); stopping "
                    "(training.nan_policy=skip skips such steps, rollback returns to the last checkpoint)"
                )
            if cfg.nan_policy == "rollback":
                self._rollback()
                return None
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)  # the non-finite gradients never reach the weights
            self._next_step()
            return None
        self.window += step_terms
        # model.parameters() after prepare: FSDP2 replaces the parameters with sharded ones.
        clip = cfg.max_grad_norm > 0
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if clip else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.raw)
        self._next_step()
        return lr, grad_norm

    def _micro_step(self, micro: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss terms' means and a 1 (the count)."""
        acc, device = self.accelerator, self.device
        x, y = next(self.batches)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        rng = SlicedRandom(self.seed, self.step, micro, self.world, self.rank, device)
        x, images = with_images(self.dataset, x, rng)  # images: what REPA's encoder reads (None for bare latents)
        draw = self.objective.draw(rng, x)  # timesteps, noise: before the label drops, in this order
        kwargs = {"y": y}
        if self.raw.y_embedder.has_null_class:  # label dropout (the embedder's rule) from the step randomness
            kwargs["force_drop_ids"] = self.raw.y_embedder.drops(rng.rand(len(x)))
        if self.raw.map_kind is not None:  # a spatial condition: the map of each (flipped) training image
            kwargs["cond_map"] = self.raw.map_kind(x, self.raw.map_size)
        if self.cfg.token_routing.enabled:  # TREAD: which tokens skip the routed blocks, drawn after the drops
            kwargs["route"] = self.cfg.token_routing.draw(rng, len(x), self.raw.num_tokens, len(self.raw.blocks))
        with acc.no_sync(self.model) if not sync else nullcontext():
            with acc.autocast():
                terms = self.objective.losses(self.model, x, draw, kwargs)
                if self.cfg.repa.enabled:  # REPA: the projected block tokens against the encoder's, on clean x
                    target = teacher_tokens(self.teacher, images, self.raw.config.grid_size)
                    terms["repa"] = repa_loss(self.repa_model.projected, target)
                    terms["loss"] = terms["loss"] + self.cfg.repa.weight * terms["repa"]
            loss = terms["loss"].mean()
            acc.backward(loss / self.cfg.grad_accum)
        return torch.stack([terms[k].mean().detach() for k in self.terms_logged] + [torch.ones((), device=device)])

    def _position(self) -> str:
        """The global batch this step trains on, as epoch:batch (the data position)."""
        return f"{self.state['epoch']}:{self.state['batch']}"

    def _rollback(self) -> None:
        """training.nan_policy=rollback: the weights, optimiser and EMA of the last whole checkpoint, the data
        position just past the bad global batch (the batches from the checkpoint to it are skipped), the records
        after the checkpoint dropped; at most training.rollback_retries times in a run."""
        acc, step, bad = self.accelerator, self.step, self._position()
        self.optimizer.zero_grad(set_to_none=True)
        history = self.state.setdefault("rollbacks", [])
        path = find_resume("auto", self.run_dir)  # the newest whole checkpoint
        why = None
        if len(history) >= self.cfg.rollback_retries:
            why = f"after {len(history)} rollbacks (training.rollback_retries)"
        elif path is None:
            why = "and no checkpoint to roll back to"
        if why:
            self.bar.close()
            earlier = "; ".join(f"step {r['step']}: batches {', '.join(r['skipped'])}" for r in history)
            raise FloatingPointError(
                f"non-finite loss at step {step} (global batch {bad}) {why}; stopping"
                + (f". Rolled back before at: {earlier}" if earlier else "")
            )
        restored = load_checkpoint(acc, self.model, self.ema, path, self.objective_settings)
        # The batches trained on since the checkpoint: from its position, or from where the last rollback to it
        # left the data (those before are skipped already)
        since = self.since if self.since[0] == restored["step"] else (restored["step"], restored)
        skipped, position = [], {"epoch": since[1]["epoch"], "batch": since[1]["batch"]}
        while True:  # through the bad batch
            skipped.append(f"{position['epoch']}:{position['batch']}")
            at_bad = skipped[-1] == bad
            _advance(position, self.batch_sampler)
            if at_bad:
                break
        history.append({"step": step, "to_step": restored["step"], "skipped": skipped})
        self.state = {**self.state, **position, "train_s": self.state["train_s"], "rollbacks": history}
        self.state["step"] = self.step = restored["step"]
        self.saved_step, self.since = None, (self.step, dict(position))  # the new data position is in no checkpoint
        self.batch_sampler.set_position(position["epoch"], position["batch"])
        self.batches = iter(self.loader)
        self.window.zero_()
        self.bar.n = self.step
        self.bar.refresh()
        self.logger.drop_after(self.step)
        self.logger.log(self.step, {"rollback_from_step": step, "skipped_batches": skipped})
        acc.print(
            f"non-finite loss at step {step} (global batch {bad}): rolled back to {path} (step {self.step}), "
            f"skipping global batches {', '.join(skipped)} (rollback {len(history)} of {self.cfg.rollback_retries})",
            file=sys.stderr,
        )

    def _next_step(self) -> None:
        _advance(self.state, self.batch_sampler)
        self.step += 1
        self.bar.update(1)

    def log(self, lr: float, grad_norm: torch.Tensor | None) -> None:
        """The log window's mean loss terms (over processes too), lr, throughput -> metrics.jsonl, trackers."""
        totals = self.accelerator.reduce(self.window, "sum")  # averaged over processes and the window
        count = max(totals[-1].item(), 1.0)
        elapsed = time.perf_counter() - self.tic
        steps_per_s = (self.step - self.tic_step) / max(elapsed, 1e-9)
        metrics = {k: totals[i].item() / count for i, k in enumerate(self.terms_logged)}
        metrics |= {
            "lr": lr,
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * self.cfg.global_batch_size,
            "epoch": self.state["epoch"],
            "skipped_steps": self.skipped,
            # the cost axes of a speed comparison: counted FLOPs and measured seconds of training, so far
            "train_flops": self.step * self.flops_per_step,
            "train_s": self.state["train_s"],
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.logger.log(self.step, metrics)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{steps_per_s:.2f}")
        self.window.zero_()
        self.tic, self.tic_step = time.perf_counter(), self.step

    # --- samples, evaluation, checkpoints ----------------------------------------------------
    def write_samples(self, at_step: int) -> None:
        """EMA sample grid (one row per class) -> run_dir/samples/step_*.png and latest.png."""
        self.ema.sync()
        if self.accelerator.is_main_process:
            labels, per_class = self.sample_labels, self.cfg.sample_per_class
            batches = generate(
                self.ema.model, self.grid_sampler, labels, batch_size=len(labels), seed=self.seed, vae=self.vae,
                device=self.device, maps=self.sample_maps,
            )  # fmt: skip
            images = torch.cat([imgs for _, imgs in batches])
            path = self.run_dir / "samples" / f"step_{at_step:07d}.png"
            save_grid(images, nrow=per_class, path=path)
            save_grid(images, nrow=per_class, path=self.run_dir / "samples" / "latest.png")
            self.logger.log_image(at_step, "samples", path)
            self.logger.plot()
        self.accelerator.wait_for_everyone()

    def evaluate(self, at_step: int) -> None:
        """FID (and what else the metric reports) of fid_samples EMA samples (fid_final_samples at the end). A stop
        signal abandons it between sampling batches: the checkpoint records it as pending, a resume runs it."""
        cfg = self.cfg
        self.ema.sync()
        if self.accelerator.is_main_process:
            n = cfg.fid_final_samples if at_step == cfg.total_steps and cfg.fid_final_samples else cfg.fid_samples
            inputs = eval_inputs(n, self.raw.num_classes, self.seed)
            maps = None
            if self.raw.map_kind is not None:  # the labels and maps of the first n held-out images
                inputs["labels"], maps = self._held_out(n)
            labels = inputs.pop("labels")
            batches = generate(
                self.ema.model, self.fid_sampler, labels, **inputs, vae=self.vae, device=self.device, maps=maps
            )
            chunks = []
            for _, imgs in batches:
                chunks.append(imgs)
                if self.stop.requested and sum(map(len, chunks)) < n:
                    self.pending = ["evaluate"]
                    break
            else:
                self._score(at_step, torch.cat(chunks), labels, maps)
        self.accelerator.wait_for_everyone()

    def _held_out(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and maps of the first n held-out images (training.map_split)."""
        if len(self.map_images) < n:
            raise ValueError(f"training.map_split has {len(self.map_images)} images; an evaluation of {n} needs n")
        images, labels = zip(*(self.map_images[i] for i in range(n)), strict=True)
        return torch.as_tensor(labels), self.raw.map_kind(torch.stack(images), self.raw.map_size)

    def _held_out_maps(self, labels: torch.Tensor) -> torch.Tensor:
        """For each label, the map of the next held-out image of that class (in the split's order)."""
        wanted = {int(k): int((labels == k).sum()) for k in labels.unique()}
        found: dict[int, list] = {k: [] for k in wanted}
        for i in range(len(self.map_images)):
            image, label = self.map_images[i]
            if len(found.get(int(label), ())) < wanted.get(int(label), 0):
                found[int(label)].append(image)
        missing = sorted(k for k in wanted if len(found[k]) < wanted[k])
        if missing:
            raise ValueError(f"training.map_split has too few images of classes {missing} for the sample grid")
        return self.raw.map_kind(torch.stack([found[int(k)].pop(0) for k in labels]), self.raw.map_size)

    def _score(self, at_step: int, images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor | None) -> None:
        """Log the metrics of an evaluation's samples (and, for a final one on more samples, the curve's point); with
        maps, how well the samples follow them (map_iou: the mean IoU of each sample's own map with its map)."""
        cfg, logger, evaluator = self.cfg, self.logger, self.evaluator
        final = len(images) > cfg.fid_samples
        measured = {"fid_extractor": evaluator.extractor.name}  # what measured it (the feature network, its hash)

        ious = None if maps is None else self._iou(images, maps)  # per sample, once

        def metrics(k: int) -> dict:
            values = evaluator.evaluate(images[:k], labels[:k]) | {"fid_n": k}
            if ious is not None:
                values |= {"map_iou": float(ious[:k].mean())}
            return values | measured

        if final:  # the curve's point at this step, from fid_samples of them (FID depends on the count)
            logger.log(at_step, metrics(cfg.fid_samples))
        prefix = "final/" if final else ""
        logger.log(at_step, metrics(len(images)), tracker_prefix=prefix)
        if final and maps is not None:  # per sample, for intervals (the report's silhouette table)
            logger.log(at_step, {"final_map_iou_per_sample": ious.tolist()})
        logger.plot()

    def _iou(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Per-sample IoU of the map of each uint8 NHWC sample with the map it was given."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return map_iou(self.raw.map_kind(x, self.raw.map_size), maps.cpu())

    def checkpoint(self, at_step: int) -> Path:
        pos = {"epoch": self.state["epoch"], "batch": self.state["batch"], "ema_num_updates": self.ema.num_updates,
               "train_s": self.state["train_s"]}  # fmt: skip
        if self.pending:
            pos["pending"] = self.pending
        if self.state.get("rollbacks"):
            pos["rollbacks"] = self.state["rollbacks"]
        path = save_checkpoint(
            self.accelerator, self.model, self.ema, self.run_dir, at_step, pos, self.data_meta or {},
            self.cfg.keep_last, self.objective_settings, self.init_record,
        )  # fmt: skip
        self.saved_step, self.since = at_step, (at_step, {"epoch": pos["epoch"], "batch": pos["batch"]})
        self.clock.reset()
        return path

    # --- end: checkpoint, samples, EMA export -------------------------------------------------
    def finish(self) -> dict:
        acc, step, run_dir = self.accelerator, self.step, self.run_dir
        self.last_ckpt = self.checkpoint(step)
        self.write_samples(step)
        weights, ema_weights = acc.get_state_dict(self.model), self.ema.sync()  # collective: full weights under FSDP
        if self.cfg.repa.enabled:
            weights = dit_weights(weights)  # the export is the DiT's: REPA's projector is training state
        if acc.is_main_process:
            from dit.model_files import save_export

            save_export(
                self.export, self.raw, ema=ema_weights, data=self.data_meta, state_dict=weights,
                objective=self.objective_settings, init_from=self.init_record,
            )  # fmt: skip
            mark_finished(run_dir, step, self.settings, self.data_meta)
            self.logger.plot()  # accelerator.end_training() below closes the trackers
            print(
                f"done: step {step}; checkpoint {self.last_ckpt}; EMA export {self.export}; "
                f"samples {run_dir / 'samples' / 'latest.png'}"
            )
        acc.wait_for_everyone()
        acc.end_training()
        return self._result(self.last_ckpt)

    def _result(self, checkpoint) -> dict:
        ema, raw = self.ema.model, self.raw
        return {"step": self.step, "checkpoint": checkpoint, "export": self.export, "ema": ema, "model": raw}


class LostProcess(RuntimeError):
    """Another process of the run died or stopped answering within training.collective_timeout_s."""


def _collective_failure(e: RuntimeError) -> bool:
    """An error raised by a collective (gloo's and NCCL's errors, torch.distributed's DistError)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(k in text for k in ("gloo", "NCCL", "Timed out"))


def _training_sampler(objective: Objective, cfg: TrainConfig, key: str, model):
    """The sampler of training.<key> (a null sampler: the objective's, training_sampler) + the model check,
    with errors that name the config key they come from."""
    try:
        sampler = build_sampler(objective, training_sampling(key, getattr(cfg, key), objective.name))
        sampler.check_model(model)
    except ValueError as e:
        raise ValueError(f"training.{key}: {e}") from None
    return sampler


def _advance(state: dict, batch_sampler: GlobalBatchSampler) -> None:
    """Move the data position past the global batch just used (including a skipped one)."""
    state["batch"] += 1
    if state["batch"] == batch_sampler.batches_per_epoch:
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
