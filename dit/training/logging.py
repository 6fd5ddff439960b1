"""Metrics: always run_dir/metrics.jsonl and loss.png / fid.png; experiment trackers through Accelerate.

The logger/ config group selects the trackers (one key per tracker; `logger=[tensorboard,wandb]`
composes several): the Accelerator is built with `log_with=trackers(cfg)` and this class starts them
with `accelerator.init_trackers` and logs with `accelerator.log`. Images (sample grids, the FID
curve) go to the trackers that show images: TensorBoard and wandb. Only the main process writes.

Resuming continues the same tracker run: TensorBoard writes to the same directory and hides the
steps after the checkpoint (SummaryWriter's purge_step), wandb continues the run whose id is in
run_dir/wandb_id.txt (wandb ignores steps it has already seen); metrics.jsonl drops them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from dit.atomic import append_line, atomic_file
from dit.eval.metrics import METRICS, SAMPLE_COUNT

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml")  # Accelerate's names = their packages
TRACKING_DIR = "tracking"  # run_dir/tracking/<project>/: TensorBoard's event files (and Aim's repository)


def fid_curve(evals: list[dict]) -> list[dict]:
    """The FID records of one curve: those on the smallest sample count (FID falls as the count grows, so
    a final FID on more samples, training.fid_final_samples, is left out). Records older than the
    count (no fid_n) belong to the curve."""
    n = min((r[SAMPLE_COUNT] for r in evals if SAMPLE_COUNT in r), default=None)
    return [r for r in evals if r.get(SAMPLE_COUNT, n) == n]


def log_scale_if_positive(ax) -> None:
    """A log y axis when every plotted value is positive; linear otherwise (REPA's term, -cosine, makes the total
    loss negative, and a log axis would drop those points)."""
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    ax.set_yscale("log" if values and min(values) > 0 else "linear")


def trackers(logger_cfg: dict | None) -> list[str]:
    """The tracker names the logger group selects, for Accelerator(log_with=...). wandb with
    mode=disabled is none. Unknown or uninstalled trackers are errors (Accelerate skips those silently)."""
    import importlib.util

    names = []
    for name, settings in (logger_cfg or {}).items():
        if name == "project":
            continue
        if name not in TRACKERS:
            raise ValueError(f"logger: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        if name == "wandb" and (settings or {}).get("mode") == "disabled":
            continue
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"logger={name} needs the {name} package: pip install {name}")
        names.append(name)
    return names


def tracking_config(run_dir: str | Path):
    """Accelerate's ProjectConfiguration: where the trackers that keep local files write."""
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / TRACKING_DIR))


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"model": {"depth": 12}} -> {"model.depth": 12}; lists as text (TensorBoard's hparams take scalars only)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class MetricsLogger:
    def __init__(self, accelerator, run_dir: Path, logger_cfg: dict | None, config: dict, resume_step: int | None):
        self.accelerator, self.run_dir, self.enabled = accelerator, Path(run_dir), accelerator.is_main_process
        self.file = self.run_dir / "metrics.jsonl"
        self._curve_step = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.file.exists():
            self.drop_after(resume_step)
        elif resume_step is None and self.file.exists():
            self.file.unlink()
        logger_cfg = logger_cfg or {}
        init_kwargs = {name: dict(logger_cfg.get(name) or {}) for name in trackers(logger_cfg)}
        if "tensorboard" in init_kwargs and resume_step is not None:
            init_kwargs["tensorboard"].setdefault("purge_step", resume_step + 1)  # hide the steps after the checkpoint
        if "wandb" in init_kwargs:
            id_file = self.run_dir / "wandb_id.txt"
            run_id = (
                id_file.read_text().strip() if id_file.exists() and resume_step is not None else uuid.uuid4().hex[:12]
            )
            id_file.write_text(run_id)
            init_kwargs["wandb"].update(dir=str(self.run_dir), id=run_id, resume="allow")
        # One project name for every tracker (wandb project, TensorBoard subdirectory); logger.wandb.project as before.
        project = (init_kwargs.get("wandb") or {}).pop("project", None) or logger_cfg.get("project") or "dit"
        accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)

    def drop_after(self, step: int) -> None:
        """Keep the trajectory true to the weights (a resume or a rollback to the checkpoint at `step`): drop the
        records logged after it from metrics.jsonl. (Trackers keep them: TensorBoard hides them on a resume.)"""
        if not self.enabled or not self.file.exists():
            return
        lines = self.file.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line).get("step", 0) <= step]
        atomic_file(self.file, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def log(self, step: int, metrics: dict, tracker_prefix: str = "") -> None:
        """One record in metrics.jsonl, and the same to the trackers (keys prefixed with tracker_prefix,
        e.g. "final/" for the last FID on more samples, which must not join the curve of the others)."""
        if not self.enabled:
            return
        append_line(self.file, json.dumps({"step": step, **metrics}), kept="the records before it are kept")
        scalars = {  # the sample count and texts / lists (e.g. class consistency per class) are for the file only
            k: v for k, v in metrics.items() if k != SAMPLE_COUNT and not isinstance(v, (str, list, tuple, dict))
        }
        self.accelerator.log({f"{tracker_prefix}{k}": v for k, v in scalars.items()}, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """An image file (a sample grid, a curve) to the trackers that show images."""
        if not self.enabled or not self.accelerator.trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(key, image, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                tracker.log_images({key: [image]}, step=step)

    def records(self) -> list[dict]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line]

    def plot(self) -> Path | None:
        """run_dir/loss.png: training loss against step; run_dir/fid.png: FID (and class consistency) against
        step, also logged to the trackers as an image when a new evaluation is in it."""
        records = [r for r in self.records() if "loss" in r]
        if not self.enabled or not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss")
        for key, label in (("mse", "mse"), ("repa", "repa (-cosine)")):  # terms of the loss, where logged
            if any(key in r for r in records):
                ax.plot(
                    [r["step"] for r in records if key in r],
                    [r[key] for r in records if key in r],
                    label=label,
                    alpha=0.7,
                )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        log_scale_if_positive(ax)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = atomic_file(self.run_dir / "loss.png", fig.savefig, suffix=".png")
        plt.close(fig)
        (key, label), *others = [curve for metric in METRICS.values() for curve in metric.plot.items()]
        evals = fid_curve([r for r in self.records() if key in r])  # the first (FID) on the left axis
        if evals:
            fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            others = [(k, lab) for k, lab in others if any(k in r for r in evals)]  # e.g. class consistency
            if others:
                ax2 = ax.twinx()
                for i, (k, lab) in enumerate(others, start=1):
                    steps, values = [r["step"] for r in evals], [r.get(k, float("nan")) for r in evals]
                    ax2.plot(steps, values, "s--", color=f"C{i}", label=lab)
                ax2.set_ylabel(", ".join(lab for _, lab in others), color="C1" if len(others) == 1 else "black")
            fig.tight_layout()
            atomic_file(self.run_dir / "fid.png", fig.savefig, suffix=".png")
            plt.close(fig)
            if evals[-1]["step"] != self._curve_step:
                self._curve_step = evals[-1]["step"]
                self.log_image(self._curve_step, "fid_curve", self.run_dir / "fid.png")
        return path
