"""Metrics: always a local JSONL file (run_dir/metrics.jsonl) and a loss-curve PNG; wandb when asked
(imported only then). Only the main process writes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: dict | None, config: dict, resume_step: int | None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.file = self.run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.file.exists():
            # Keep the trajectory true to the weights: drop records logged after the checkpoint.
            kept = [line for line in self.file.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.file.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.file.exists():
            self.file.unlink()
        if wandb_cfg and wandb_cfg.get("mode", "disabled") != "disabled":
            import wandb  # only when used

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() and resume_step is not None else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=wandb_cfg.get("project", "dit"),
                entity=wandb_cfg.get("entity"),
                name=wandb_cfg.get("name"),
                mode=wandb_cfg["mode"],
                dir=str(self.run_dir),
                config=config,
                id=run_id,
                resume="allow",
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def records(self) -> list[dict]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line]

    def plot(self) -> Path | None:
        """run_dir/loss.png: training loss against step (and any eval metric logged as fid*)."""
        records = [r for r in self.records() if "loss" in r]
        if not self.enabled or not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss")
        if any("mse" in r for r in records):
            ax.plot([r["step"] for r in records], [r["mse"] for r in records], label="mse", alpha=0.7)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        evals = [r for r in self.records() if "fid" in r]
        if evals:  # run_dir/fid.png: FID (and class consistency) against step
            fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
            ax.plot([r["step"] for r in evals], [r["fid"] for r in evals], "o-", label="FID")
            ax.set_xlabel("step")
            ax.set_ylabel("FID")
            ax.grid(alpha=0.3)
            if any("class_consistency" in r for r in evals):
                ax2 = ax.twinx()
                ax2.plot([r["step"] for r in evals], [r.get("class_consistency", float("nan")) for r in evals], "s--", color="C1")
                ax2.set_ylabel("class consistency", color="C1")
            fig.tight_layout()
            fig.savefig(self.run_dir / "fid.png")
            plt.close(fig)
        return path

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
