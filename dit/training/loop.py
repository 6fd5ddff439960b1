"""The training loop as a Trainer (torchtitan's split): setup, train_step, evaluate, checkpoint, finish.

Called by train.py (through `train`) with built objects and plain settings; it never sees a Hydra config.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from dit.data import GlobalBatchSampler, to_device, with_images
from dit.hub import ModelRecord, export_config, save_export
from dit.integrity import read_json
from dit.models.flops import training_flops
from dit.training.addons import build_addons
from dit.training.checkpointing import (
    CheckpointState,
    all_processes,
    find_resume,
    load_checkpoint,
    main_process_says,
    save_checkpoint,
)
from dit.training.config import check_settings
from dit.training.digest import settings_digest
from dit.training.ema import EMA
from dit.training.evaluation import Drawing, Evaluation, HeldOut, SampleGrids, build_evaluator, build_training_sampler
from dit.training.init_from import initialize
from dit.training.job import TrainingJob
from dit.training.logging import MetricsLogger
from dit.training.optim import build_optimizer, lr_at, optimizer_flops
from dit.training.preemption import CheckpointClock, Control, Stopped, StopRequest
from dit.training.processes import LostProcess, build_accelerator, collective_failure
from dit.training.randomness import SlicedRandom
from dit.training.recovery import advance, batches_to_skip, check_rollback, position_name, stop_error
from dit.training.run import FINISHED, finished_info, mark_finished, unmark_finished

__all__ = ["Trainer", "train"]


def train(job: TrainingJob) -> dict:
    """Train; returns {"step", "checkpoint", "export"} (and "ema", "model" when it trained or was exported). Every
    process calls it."""
    return Trainer(job).fit()


class Trainer:
    """One training run: `fit()` = setup, then train_step (with its logging, samples, evaluations and
    checkpoints) until cfg.total_steps, then finish. Every process builds one."""

    def __init__(self, job: TrainingJob):
        self.job, self.model, self.dataset, self.objective = job, job.model, job.dataset, job.objective
        self.run_dir, self.cfg, self.o, self.seed = job.run_dir, job.training, job.optim, job.seed
        self.init_record = None
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
                if self.world > 1 and collective_failure(e):
                    raise LostProcess.after(e, self.step, self.last_ckpt) from e
                raise
            finally:  # now: closed at exit, the bar's last refresh would print after the error's line
                self.bar.close()

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
            if self.grids.due(self.step):
                self.write_samples(self.step)
            if self.evaluation is not None and self.evaluation.due(self.step):
                self.evaluate(self.step)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.total_steps:
                self.last_ckpt = self.checkpoint(self.step)
            if cfg.phema_snapshot_every and self.step % cfg.phema_snapshot_every == 0 or self.step == cfg.total_steps:
                self.ema.snapshot(self.run_dir, self.step, self.accelerator.is_main_process)  # (no profiles: nothing)
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
        if "evaluate" in self.pending and self.evaluation is not None:
            self.pending = []
            self.evaluate(self.step)
            self.saved_step = None  # the checkpoint still lists it: a stop now saves this step again

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
        cfg, objective, model = self.cfg, self.objective, self.model
        self.accelerator = build_accelerator(cfg, self.job.logger_config, self.run_dir)
        acc = self.accelerator
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.control, self.clock = Control(cfg.collective_timeout_s), CheckpointClock(cfg.ckpt_every_minutes)
        self.batch_size = check_settings(cfg, self.world)
        set_seed(self.seed + self.rank)  # per-rank seeds; the step randomness itself comes from SlicedRandom
        objective.check_model(model)
        self.objective_settings = objective.settings()
        # Built once, used by every grid and FID evaluation; bad settings fail here, before any step.
        self.grid_sampler = build_training_sampler(objective, cfg, "grid_sampling", model)
        self.fid_sampler = build_training_sampler(objective, cfg, "fid_sampling", model) if cfg.fid_every else None
        self.resume_from = find_resume(self.job.resume, self.run_dir)  # before anything is written
        self.settings = settings_digest(self.job.config)

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
        if not (self.job.resume == "auto" and all_processes(acc, self.resume_from is None)):
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
        if not self.job.init_from:
            return
        if self.resume_from is not None:
            self.init_record = read_json(Path(self.resume_from) / "config.json").get("init_from")
            return
        done = initialize(self.model, self.job.init_from, self.job.init_from_class_map)
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
        self.addons = build_addons(cfg, model, self.dataset)  # their checks first: nothing is built yet
        self.held_out = HeldOut.of_run(model, self.dataset, self.job.map_images)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup, cfg.phema_sigma_rels)  # of the DiT alone
        trained, per_image = model, training_flops(model.config)  # the DiT's forward and backward on one image
        per_image = self.objective.training_flops(model.config, per_image)  # and the objective's own passes
        for addon in self.addons:  # an add-on may train the DiT inside a module of its own
            trained = addon.wrap(trained, self.device, self.seed)
            per_image = addon.training_flops(model, per_image)
        optimizer = build_optimizer(trained, o)
        # FLOPs of one optimiser step, counted once: the global batch through the DiT (and what the add-ons add), and
        # the optimiser's matrix work on every process (Muon's Newton-Schulz)
        self.flops_per_step = per_image * cfg.global_batch_size + optimizer_flops(optimizer) * self.world
        trained.train()
        if cfg.compile:
            model.compile()  # in place: parameter and state-dict names stay those of the DiT
        self.model, self.optimizer = self.accelerator.prepare(trained, optimizer)
        self.ema.model.to(self.device)
        # The DiT itself (its parameters are the live ones), from inside the add-ons' wrappers.
        self.raw = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        for addon in reversed(self.addons):
            self.raw = addon.inner(self.raw)
        self.model_record = ModelRecord(self.objective_settings, self.job.data_meta, self.init_record)

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
                mark_finished(run_dir, step, self.settings, self.job.data_meta)
            message = f"{run_dir}: already finished at step {step}; EMA export in {self.export}"
            return self._leave(message, self._result(self.resume_from))
        return None

    def _setup_outputs(self) -> None:
        acc, cfg, run_dir, device = self.accelerator, self.cfg, self.run_dir, self.device
        if acc.is_main_process:
            unmark_finished(run_dir)  # trained again (longer, afresh, other settings): the old record no longer holds
        resume_step = self.step if self.resume_from else None
        self.logger = MetricsLogger(acc, run_dir, self.job.logger_config, self.job.config, resume_step)
        drawing = Drawing(self.job.vae, device, self.seed, self.held_out)
        self.grids = SampleGrids(cfg, self.grid_sampler, drawing, self.raw.num_classes, run_dir)
        if acc.is_main_process:
            self.grids.save_maps(self.raw.input_size)
        self.evaluation = None
        if cfg.fid_every:
            evaluator = build_evaluator(cfg, device, run_dir) if acc.is_main_process else None
            self.evaluation = Evaluation(cfg, self.fid_sampler, evaluator, drawing, run_dir)
        self.batches = iter(self.loader)
        # What is logged: the objective's terms (e.g. "loss", "mse", "vb"), then the add-ons'.
        self.terms_logged = (*self.objective.loss_terms, *(t for addon in self.addons for t in addon.terms))
        # Sums of each term and the count over the log window.
        self.window = torch.zeros(len(self.terms_logged) + 1, device=device)
        self.skipped, self.tic, self.tic_step = 0, time.perf_counter(), self.step
        self.bar = tqdm(
            total=cfg.total_steps, initial=self.step, unit="step", disable=not acc.is_main_process, dynamic_ncols=True
        )

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
                raise stop_error(step, position_name(self.state))
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
        x, images = with_images(self.dataset, x, rng)  # images: the clean images (None for bare latents)
        draw = self.objective.draw(rng, x)  # timesteps, noise: before the label drops, in this order
        kwargs = {"y": y}
        if self.raw.y_embedder.has_null_class:  # label dropout (the embedder's rule) from the step randomness
            kwargs["force_drop_ids"] = self.raw.y_embedder.drops(rng.rand(len(x)))
        if self.raw.map_kind is not None:  # a spatial condition: the map of each (flipped) training image
            kwargs["cond_map"] = self.raw.map_kind(x, self.raw.map_size)
        for addon in self.addons:  # drawn after the drops, in ADDONS order
            kwargs |= addon.conditions(rng, self.raw, len(x))
        anomaly = torch.autograd.set_detect_anomaly(self.cfg.detect_anomaly)  # for this forward and backward only
        with acc.no_sync(self.model) if not sync else nullcontext(), anomaly:
            with acc.autocast():
                terms = self.objective.losses(self.model, x, draw, kwargs)
                for addon in self.addons:  # extra terms, e.g. on the clean images
                    addon.add_losses(terms, images)
            loss = terms["loss"].mean()
            acc.backward(loss / self.cfg.grad_accum)
        return torch.stack([terms[k].mean().detach() for k in self.terms_logged] + [torch.ones((), device=device)])

    def _rollback(self) -> None:
        """training.nan_policy=rollback: the weights, optimiser and EMA of the last whole checkpoint, the data
        position just past the bad global batch (the batches from the checkpoint to it are skipped), the records
        after the checkpoint dropped; at most training.rollback_retries times in a run."""
        acc, step, bad = self.accelerator, self.step, position_name(self.state)
        self.optimizer.zero_grad(set_to_none=True)
        history = self.state.setdefault("rollbacks", [])
        path = find_resume("auto", self.run_dir)  # the newest whole checkpoint
        try:
            check_rollback(step, bad, history, self.cfg.rollback_retries, path)
        except FloatingPointError:
            self.bar.close()
            raise
        restored = load_checkpoint(acc, self.model, self.ema, path, self.objective_settings)
        # The batches trained on since the checkpoint: from its position, or from where the last rollback to it
        # left the data (those before are skipped already)
        since = self.since if self.since[0] == restored["step"] else (restored["step"], restored)
        skipped, position = batches_to_skip(since[1], bad, self.batch_sampler.batches_per_epoch)
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
        advance(self.state, self.batch_sampler.batches_per_epoch)
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

    def write_samples(self, at_step: int) -> None:
        """The EMA's sample grid (SampleGrids), on the main process."""
        self.ema.sync()
        if self.accelerator.is_main_process:
            self.grids.run(self.ema.model, at_step, self.logger)
        self.accelerator.wait_for_everyone()

    def evaluate(self, at_step: int) -> None:
        """The EMA's FID evaluation (Evaluation), on the main process. A stop signal abandons it between sampling
        batches: the checkpoint records it as pending, a resume runs it."""
        self.ema.sync()
        if self.accelerator.is_main_process:
            if not self.evaluation.run(self.ema.model, at_step, self.logger, lambda: self.stop.requested):
                self.pending = ["evaluate"]
        self.accelerator.wait_for_everyone()

    def checkpoint(self, at_step: int) -> Path:
        state, cfg, acc = self.state, self.cfg, self.accelerator
        pos = {"epoch": state["epoch"], "batch": state["batch"], "ema_num_updates": self.ema.num_updates}
        pos |= {"train_s": state["train_s"]} | ({"pending": self.pending} if self.pending else {})
        if state.get("rollbacks"):
            pos["rollbacks"] = state["rollbacks"]
        record = CheckpointState(at_step, pos, export_config(self.raw, self.model_record))
        path = save_checkpoint(acc, self.model, self.ema, self.run_dir, record, cfg.keep_last, cfg.low_disk)
        self.saved_step, self.since = at_step, (at_step, {"epoch": pos["epoch"], "batch": pos["batch"]})
        self.clock.reset()
        return path

    def finish(self) -> dict:
        acc, step, run_dir = self.accelerator, self.step, self.run_dir
        self.last_ckpt = self.checkpoint(step)
        self.write_samples(step)
        weights, ema_weights = acc.get_state_dict(self.model), self.ema.sync()  # collective: full weights under FSDP
        for addon in reversed(self.addons):  # the export is the DiT's (what the add-ons train beside it is not)
            weights = addon.export_weights(weights)
        if acc.is_main_process:
            save_export(self.export, self.raw, self.model_record, ema=ema_weights, state_dict=weights)
            mark_finished(run_dir, step, self.settings, self.job.data_meta)  # (the curves: plotted with the grid)
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
