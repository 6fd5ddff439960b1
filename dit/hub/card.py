"""The model card of an export (python -m dit.hub.export): README.md with the Hub's YAML metadata, built from the run.

What the training run recorded is read once into a RunRecord (its composed config and command-line overrides
in .hydra/, metrics.jsonl, the sample grid of the exported step); model_card() turns it, the export's
config.json and what was written (WrittenExport, HubMetadata) into a huggingface_hub ModelCard: metadata
(library, tags, datasets, metrics, a model-index with the final evaluation) and a body (architecture and block,
objective and sampler, training budget, the final metrics with their sample counts and evaluator, the sample
grid, the exact command to sample the export). Nothing here is guessed: what the run did not record is left out.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dit.diffusion import SamplingSettings, build_objective
from dit.eval.metrics import METRICS, SAMPLE_COUNT, value_format
from dit.hub.files import objective_settings
from dit.integrity import DamagedFileError
from dit.models import DiT

__all__ = ["HubMetadata", "RunRecord", "SampleCommand", "WrittenExport", "model_card"]

Library = Literal["dit", "diffusers"]

# Our data names -> their Hub dataset ids (the card's `datasets`); others need --dataset.
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}
EXTRACTOR = "fid_extractor"  # what measured an evaluation record (the feature network and its hash)
FORMATS = {
    "dit": "A dit export: `config.json` (architecture, objective, data), `ema.safetensors` (the "
    "EMA weights, what sampling uses) and, where the run had them, `model.safetensors` (the raw weights).",
    "diffusers": "A diffusers `DiTPipeline`: `transformer/` (DiTTransformer2DModel), `vae/` (AutoencoderKL), "
    "`scheduler/` (DPMSolverMultistepScheduler on the model's betas), `model_index.json` with the class names "
    "(`id2label`). DiTPipeline guides with the null class 1000: a model of fewer classes has copies of its null "
    "row at the unused ids.",
}
PIPELINE_STEPS = 25  # num_inference_steps of the card's DiTPipeline example (DPM-Solver++ is good at 20-25)


@dataclass
class RunRecord:
    """What a training run recorded about the exported weights; empty outside a run (a bare checkpoint)."""

    run_dir: Path | None = None
    step: int | None = None  # the optimiser step of the exported weights (None: not recorded)
    config: dict = field(default_factory=dict)  # .hydra/config.yaml as composed (interpolations unresolved)
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml: train.py's command line
    records: list[dict] = field(default_factory=list)  # metrics.jsonl up to `step`
    grid: Path | None = None  # samples/step_<step>.png: the EMA grid of these weights

    @classmethod
    def read(cls, run_dir: Path | None, step: int | None) -> RunRecord:
        if run_dir is None:
            return cls()
        hydra = run_dir / ".hydra"
        config = _read_yaml(hydra / "config.yaml") or {}
        overrides = _read_yaml(hydra / "overrides.yaml") or []
        records = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            for n, line in enumerate(metrics.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DamagedFileError(metrics, f"line {n} is not JSON ({e})") from None
        if step is not None:
            records = [r for r in records if r.get("step", 0) <= step]
        grid = run_dir / "samples" / f"step_{step:07d}.png" if step is not None else None
        return cls(
            run_dir, step, config, [str(o) for o in overrides], records, grid if grid and grid.exists() else None
        )

    def setting(self, *keys: str, default=None):
        """config[keys[0]][keys[1]]..., or default where the run did not record it."""
        node = self.config
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def final_evaluations(self) -> list[dict]:
        """The evaluation records of the last evaluated step (two when a final FID used more samples)."""
        metric_keys = {key for metric in METRICS.values() for key in metric.keys}
        evals = [r for r in self.records if metric_keys & set(r)]
        if not evals:
            return []
        last = max(r["step"] for r in evals)
        return [r for r in evals if r["step"] == last]

    def last(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the last record holding key (e.g. train_flops, logged every log_every steps)."""
        found = [r for r in self.records if key in r]
        return (found[-1]["step"], found[-1][key]) if found else None


def _read_yaml(path: Path):
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DamagedFileError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None


@dataclass
class SampleCommand:
    """The sampling settings a card's command uses: the run's grid settings where recorded."""

    sampler: str
    steps: int
    cfg_scale: float
    classes: list[int]  # the classes sampled (all of them up to 10, else the first 8)
    per_class: int = 8  # images per class (one row each): the run's training.sample_per_class
    guidance: str = "cfg"  # the grid's (input: a model with a guidance input, guided in one call)

    @classmethod
    def for_model(cls, model: DiT, objective: dict, run: RunRecord) -> SampleCommand:
        grid = run.setting("training", "grid_sampling", default={}) or {}
        defaults = SamplingSettings()
        sampler = grid.get("sampler") or build_objective(**objective).default_sampler
        classes = list(range(model.num_classes if model.num_classes <= 10 else 8))
        per_class = int(run.setting("training", "sample_per_class", default=8))
        steps, scale = int(grid.get("steps", defaults.steps)), float(grid.get("cfg_scale", 4.0))
        return cls(sampler, steps, scale, classes, per_class, grid.get("guidance") or defaults.guidance)

    def sample_py(self, checkpoint: str, per_class: int | None = None, **extra) -> str:
        args = dict(checkpoint=checkpoint, sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale)
        args |= {} if self.guidance == "cfg" else {"guidance": self.guidance}
        args |= dict(classes=f"[{','.join(map(str, self.classes))}]", per_class=per_class or self.per_class) | extra
        return "python sample.py " + " ".join(shlex.quote(f"{k}={v}") for k, v in args.items())


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else f"{value:,}"


def _metric_label(key: str) -> str:
    metric = next((m for m in METRICS.values() if key in m.keys), None)
    if metric is not None and key == metric.keys[0]:
        return metric.title
    return key.replace("_", " ")


def _numeric_metrics(record: dict) -> dict[str, float]:
    keys = [key for metric in METRICS.values() for key in metric.keys]
    return {k: record[k] for k in keys if isinstance(record.get(k), (int, float))}


@dataclass(frozen=True)
class WrittenExport:
    """What the card describes: the export as written."""

    library: Library  # "diffusers" for a DiTPipeline, "dit" for ours
    directory: str  # what the card's commands load (without a Hub repo)
    grid_file: str | None = None  # the sample grid's name inside the export
    notes: tuple[str, ...] = ()  # paragraphs said first (why it is not a DiTPipeline, how a DiTPipeline differs)


@dataclass(frozen=True)
class HubMetadata:
    """What the card tells the Hub: the repo the export is pushed to (the card's commands download it from
    there), its dataset id (default: HUB_DATASETS) and license id (default: none)."""

    repo_id: str | None = None
    dataset: str | None = None
    license: str | None = None


def model_card(
    model: DiT, config: dict, run: RunRecord, written: WrittenExport, hub: HubMetadata | None = None
) -> ModelCard:
    """The ModelCard of an export. config: the export's config.json contents (architecture, objective, data,
    init_from)."""
    hub = hub or HubMetadata()
    c = model.config
    objective = objective_settings(config)
    data = config.get("data") or {}
    names = data.get("class_names")
    data_name = data.get("name") or run.setting("data", "name") or "unknown data"
    dataset = hub.dataset or HUB_DATASETS.get(data_name)
    command = SampleCommand.for_model(model, objective, run)
    flow = objective["name"] == "flow"
    tags = ["dit", "diffusion-transformer", "class-conditional", "image-generation", c.block.replace("_", "-")]
    tags += ["flow-matching" if flow else "ddpm", "latent-diffusion" if data.get("latent") else "pixel-space"]
    evals = run.final_evaluations()
    eval_results = _eval_results(evals, run, dataset or data_name, data_name)
    title = f"{c.name or 'DiT'} ({c.block}), {'flow matching' if flow else 'DDPM'}, {data_name}"
    card_data = ModelCardData(
        library_name=written.library,
        tags=tags,
        datasets=[dataset] if dataset else None,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        license=hub.license,
        model_name=title,
        eval_results=eval_results or None,
    )
    body = [f"# {title}", ""]
    if (init := config.get("init_from")) and isinstance(init, dict) and init.get("source"):
        body += [f"Fine-tuned from {init['source']}.", ""]
    if (ema := config.get("ema")) and isinstance(ema, dict) and ema.get("kind") == "power":
        body += [
            f"EMA weights chosen after training: EDM2's post-hoc EMA of relative width {ema.get('sigma_rel')} at step "
            f"{ema.get('step')}, reconstructed from {ema.get('snapshots')} snapshots (python -m dit.phema).",
            "",
        ]
    body += [FORMATS[written.library], ""] + [*(f"{note}\n" for note in written.notes)]
    body += _use(written, hub.repo_id, command, names)
    if written.grid_file:
        body += _grid(written.grid_file, run, names, objective)
    body += _model(model, objective, data, names)
    body += _training(run)
    body += _evaluation(evals, run, objective)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")


def _eval_results(evals: list[dict], run: RunRecord, dataset_type: str, data_name: str) -> list[EvalResult]:
    """The model-index of the card: the final evaluation on the most samples, one result per metric."""
    if not evals:
        return []
    best = max(evals, key=lambda r: r.get(SAMPLE_COUNT, 0))  # the result: the evaluation on the most samples
    ref = str(run.setting("training", "fid_ref", default="") or "")
    measured = f"{best.get(SAMPLE_COUNT, '?')} samples, {best.get(EXTRACTOR, 'unknown')}"
    return [
        EvalResult(
            task_type="image-generation",
            task_name="class-conditional image generation",
            dataset_type=dataset_type,
            dataset_name=data_name,
            dataset_split=ref.split(":", 1)[1] if ":" in ref else None,
            metric_type=key,
            metric_value=float(value),
            metric_name=f"{_metric_label(key)} ({measured})",
            metric_config=best.get(EXTRACTOR),
            metric_args={"samples": best.get(SAMPLE_COUNT)},
        )
        for key, value in _numeric_metrics(best).items()
    ]


def _use(written: WrittenExport, repo_id: str | None, command: SampleCommand, names) -> list[str]:
    local = repo_id.split("/")[-1] if repo_id else written.directory
    if written.library == "dit":
        lines = ["## Sample", "", "With dit's sample.py (one row per class, `grid.png` in `out_dir`):", "", "```bash"]
        if repo_id:
            lines += [f"hf download {repo_id} --local-dir {local}"]
        lines += [command.sample_py(local), "```", ""]
        lines += [f"In Python: `model, meta = dit.hub.load_model({local!r})`.", ""]
        return lines
    location = repo_id or written.directory
    ids = command.classes[:4]
    label_hint = f"  # = pipe.get_label_ids({[names[i] for i in ids]!r})" if names else ""
    snippet = [
        "import torch",
        "from diffusers import DiTPipeline",
        "",
        f"pipe = DiTPipeline.from_pretrained({location!r})",
        f"class_labels = {ids!r}{label_hint}",
        f"images = pipe(class_labels=class_labels, num_inference_steps={PIPELINE_STEPS}, "
        f"guidance_scale={command.cfg_scale}, generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")',
    ]
    same = SampleCommand("dpmpp", PIPELINE_STEPS, command.cfg_scale, ids)
    return [
        "## Sample",
        "",
        "With diffusers:",
        "",
        "```python",
        *snippet,
        "```",
        "",
        "The pipeline's scheduler is DPM-Solver++(2M) on the model's own betas, dit's `dpmpp` sampler: with dit the "
        "same images (to one level in 255: float rounding), seed for seed:",
        "",
        "```bash",
        *([f"hf download {repo_id} --local-dir {local}"] if repo_id else []),
        same.sample_py(local, per_class=1, seed=0),
        "```",
        "",
    ]


def _grid(grid_file: str, run: RunRecord, names, objective: dict) -> list[str]:
    grid = run.setting("training", "grid_sampling", default={}) or {}
    sampler = grid.get("sampler") or build_objective(**objective).default_sampler
    rows = ", ".join(names[: run.setting("training", "sample_max_classes", default=10)]) if names else "class ids"
    how = f"sampler {sampler}, {grid.get('steps', '?')} steps, guidance {grid.get('cfg_scale', '?')}"
    caption = f"EMA samples at step {run.step}, one row per class ({rows}); {how}."
    return [f"![EMA samples at step {run.step}]({grid_file})", "", caption, ""]


def _model(model: DiT, objective: dict, data: dict, names) -> list[str]:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    backbone = f"{c.norm}, {'qk-norm, ' if c.qk_norm else ''}{c.mlp} MLP, {c.pos_embed} positions"
    space = f"{c.input_size}x{c.input_size}x{c.in_channels}"
    inputs = f"{space} latents of the VAE {data.get('vae')}" if data.get("latent") else f"{space} pixels"
    classes = f"{c.num_classes}" + (f": {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else "")
    settings = ", ".join(f"{k} {v}" for k, v in objective.items() if k != "name")
    obj = build_objective(**objective)
    size = f"depth {c.depth}, width {c.hidden_size}, {c.num_heads} heads, patch {c.patch_size}"
    rows = [
        ("architecture", f"{c.name or 'custom'}: {size}, {params / 1e6:.2f}M parameters"),
        ("conditioning block", c.block),
        ("backbone", backbone),
        ("input", inputs),
        ("classes", f"{classes} (+ a learned null class for guidance)" if c.class_dropout_prob > 0 else classes),
        ("objective", f"{objective['name']} ({settings})"),
        ("samplers", f"default {obj.default_sampler}; in-training FID {obj.eval_sampler}"),
    ]
    return ["## Model", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _training(run: RunRecord) -> list[str]:
    if run.run_dir is None:
        return ["## Training", "", "Exported without its training run: no training record.", ""]
    batch = run.setting("training", "global_batch_size")
    rows = [("steps", _fmt(run.step) if run.step is not None else "not recorded")]
    if batch is not None:
        rows.append(("global batch", _fmt(batch)))
        if run.step is not None:
            rows.append(("images seen", _fmt(run.step * batch)))
    if flops := run.last("train_flops"):
        rows.append(("training compute (counted)", f"{flops[1]:.3g} FLOPs to step {flops[0]}"))
    if seconds := run.last("train_s"):
        rows.append(("training time", f"{seconds[1]:.3g} s to step {seconds[0]}"))
    optim = run.setting("optim", default={}) or {}
    if optim:
        schedule = f"{optim.get('decay', 'constant')} after {optim.get('warmup_steps', 0)} warm-up steps"
        rows.append(("optimiser", f"{optim.get('name')} lr {optim.get('lr')}, {schedule}"))
    if (ema := run.setting("training", "ema_decay")) is not None:
        rows.append(("EMA decay", ema))
    if (precision := run.setting("training", "mixed_precision")) is not None:
        rows.append(("mixed precision", precision))
    data = run.setting("data", default={}) or {}
    if data:
        limit = f", the first {data['limit']} images" if data.get("limit") else ""
        rows.append(("data", f"{data.get('name')}{limit}"))
    lines = ["## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if run.overrides:
        lines += ["The run's command:", "", "```bash", "python train.py " + shlex.join(run.overrides), "```", ""]
    return lines


def _evaluation(evals: list[dict], run: RunRecord, objective: dict) -> list[str]:
    if not evals:
        return ["## Evaluation", "", "No evaluation recorded." if run.run_dir else "", ""]
    fid = run.setting("training", "fid_sampling", default={}) or {}
    sampler = fid.get("sampler") or build_objective(**objective).eval_sampler
    how = f"sampler {sampler}, {fid.get('steps', '?')} steps, guidance {fid.get('cfg_scale', '?')}"
    ref = run.setting("training", "fid_ref")
    lines = ["## Evaluation", "", f"At step {evals[0]['step']}, EMA samples ({how}) against {ref}:", ""]
    lines += ["| metric | value | samples | measured with |", "|---|---|---|---|"]
    for record in evals:
        for key, value in _numeric_metrics(record).items():
            cells = [_metric_label(key), f"{value:{value_format(key)}}", record.get(SAMPLE_COUNT, "?")]
            lines.append(f"| {' | '.join(map(str, cells))} | {record.get(EXTRACTOR, 'unknown')} |")
    return [*lines, ""]
