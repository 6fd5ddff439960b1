"""A study's runs as the report reads them: each job directory's config, metrics and status (finished, failed,
unfinished), the arms the runs fall into, and the figures of each finished run.

A study is studies/<name>/ (its runs under runs/, its claims.yaml) or a sweep directory (the runs directly under
it). Runs are grouped into arms by what differs between their configs apart from the seed (for the conditioning
study: ``model.block``); the seeds of an arm are its replicates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from dit.eval.metrics import metric_keys
from dit.models import DiTConfig
from dit.models.flops import count_config
from dit.training.config import register_configs
from dit.training.logging import fid_curve
from dit.training.run import FAILURE_NOTE, finished_info

# What runs from before the Fashion-MNIST classifier was shipped (issue 27) were measured with: they recorded no
# extractor, and their classifier was trained on each machine (its weights are on none now).
OLD_EXTRACTOR = "fashion-mnist-cnn-v1 (earlier, locally trained; no hash)"

# What the papers state about the order of arms lives with the study, in <multirun>/claims.yaml: per arm key, a
# list of {better, worse, source} (the arm they find better, i.e. with the lower FID, the worse one, the source and
# its words); checked against this study's tests.
CLAIMS_FILE = "claims.yaml"


def load_claims(multirun: Path) -> dict[str, list[tuple[str, str, str]]]:
    """The study's published claims (claims.yaml next to its runs), or {} when it has none."""
    path = Path(multirun) / CLAIMS_FILE
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {key: [(c["better"], c["worse"], c["source"]) for c in claims] for key, claims in data.items()}


def run_config(path: Path) -> dict:
    """A run's composed config, resolved: Hydra saves it with its interpolations (model.size fills the model's
    sizes through ${dit.size:...}, the data's shape fills the model's)."""
    register_configs()  # the ${dit.*} resolvers (idempotent)
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_run(job_dir: Path) -> dict:
    """One job directory -> {name, config, records, status, finished} (status 'ok' or why not; finished: its
    finished.json record or None)."""
    config = run_config(job_dir / ".hydra" / "config.yaml")
    metrics = job_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    total = config["training"]["total_steps"]
    last = max((r["step"] for r in records), default=0)
    note = job_dir / FAILURE_NOTE
    reason = note.read_text().strip() if note.exists() else None
    # finished: its export (weights) is there, or its finished.json (results kept without the weights)
    done = finished_info(job_dir)
    if ((job_dir / "model" / "config.json").exists() or (done and done["step"] == total)) and last >= total:
        status = "ok"
    elif reason:
        status = f"failed at step {last} of {total}: {reason}"
    elif not records:
        status = "failed: no metrics were written"
    else:
        status = f"unfinished: stopped at step {last} of {total}"
    return dict(
        name=job_dir.name, dir=job_dir, config=config, records=records, status=status, last_step=last, finished=done
    )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)  # lists and None compare as text
    return out


def arm_keys(runs: list[dict], by: list[str] | None = None) -> list[str]:
    """The config keys that tell the arms apart: ``by``, or those that vary between runs except the seed and where
    a run resumed from (a run continued from a checkpoint trains what a run from step 0 would)."""
    if by:
        return by
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if k not in ("seed", "resume") and len({f.get(k) for f in flat}) > 1]
    return varying or ["model.block"]


def arm_label(run: dict, keys: list[str]) -> str:
    flat = flatten(run["config"])
    values = [json.loads(flat[k]) if k in flat else None for k in keys]
    if len(keys) == 1:
        return str(values[0])
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values))


def summarize(run: dict) -> dict:
    """The figures of one finished run. The final FID is the last record with the most samples."""
    cfg, recs = run["config"], run["records"]
    m = cfg["model"]
    fields = {f.name for f in dataclasses.fields(DiTConfig)} - {"fused_adaln"}
    size = count_config(DiTConfig(**{k: v for k, v in m.items() if k in fields}))  # as recorded, map inputs too
    losses = [r["loss"] for r in recs if "loss" in r]
    # the final FID: taken at the last step, on the most samples evaluated there
    evals = [r for r in recs if "fid" in r and r["step"] == cfg["training"]["total_steps"]]
    final = max(evals, key=lambda r: r.get("fid_n", 0)) if evals else {}
    speeds = [r["images_per_s"] for r in recs if "images_per_s" in r][1:]  # the first window holds start-up
    return dict(
        seed=cfg.get("seed"),
        block=m["block"],
        model=m["name"],
        params=size["params"],
        gflops=size["gflops"],
        final_loss=statistics.mean(losses[-3:]) if losses else None,
        fid=final.get("fid"),
        fid_n=final.get("fid_n"),
        # runs from before the classifier was shipped did not record it
        fid_extractor=final.get("fid_extractor", OLD_EXTRACTOR) if final else None,
        class_consistency=final.get("class_consistency"),
        class_consistency_min=final.get("class_consistency_min"),
        per_class=final.get("class_consistency_per_class"),
        map_iou=final.get("map_iou"),  # a spatial condition: how well the samples follow their maps
        images_per_s=statistics.median(speeds) if speeds else None,
    )


def class_names(run: dict) -> list[str] | None:
    """The class names the run recorded (finished.json, or data.class_names in the export's config.json), if any."""
    done = run.get("finished")
    if done and done.get("class_names"):
        return done["class_names"]
    export = run["dir"] / "model" / "config.json"
    return (json.loads(export.read_text()).get("data") or {}).get("class_names") if export.exists() else None


def curve(run: dict, key: str) -> dict[int, float]:
    """step -> value of one run; for a metric (FID, ...) only the records with the curve's sample count."""
    recs = [r for r in run["records"] if key in r]
    if key in metric_keys():
        recs = fid_curve(recs)
    return {r["step"]: r[key] for r in recs}


def job_dirs(study: Path) -> list[Path]:
    """A study's run directories (those with a Hydra config): under <study>/runs/ when it has one (the layout of
    studies/<name>/), else directly under <study> (a sweep directory as Hydra writes it)."""
    runs = study / "runs" if (study / "runs").is_dir() else study
    jobs = sorted(p.parent.parent for p in runs.glob("*/.hydra/config.yaml"))
    if not jobs:
        raise FileNotFoundError(f"{study}: no Hydra job directories (*/.hydra/config.yaml)")
    return jobs


def collect(study: Path, by: list[str] | None = None) -> dict:
    """Every run of a study, its arm, and the summaries of the finished ones by arm, arms sorted by mean final FID."""
    runs = [load_run(j) for j in job_dirs(study)]
    keys = arm_keys(runs, by)
    for r in runs:
        r["arm"] = arm_label(r, keys)
    ok = [r for r in runs if r["status"] == "ok"]
    for r in ok:
        r["summary"] = summarize(r)
    summaries: dict[str, list[dict]] = {}
    for r in ok:
        summaries.setdefault(r["arm"], []).append(r["summary"])
    order = sorted(
        summaries,
        key=lambda a: statistics.fmean([s["fid"] for s in summaries[a] if s["fid"] is not None] or [math.inf]),
    )
    ok_arms = {a: [r for r in ok if r["arm"] == a] for a in order}  # curves and grids: finished runs only
    header = keys[0].rsplit(".", 1)[-1] if len(keys) == 1 else "arm"  # one column: the label says "k=v, k=v" itself
    return dict(runs=runs, keys=keys, ok=ok, summaries=summaries, order=order, ok_arms=ok_arms, header=header)
