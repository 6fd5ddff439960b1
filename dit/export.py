"""Share a model: python -m dit.export <run dir or checkpoint> -o DIR [--format ours|diffusers] [--push REPO_ID]

    python -m dit.export outputs/fashion_mnist-dit_ti4-adaln_zero -o exports/fmnist           # ours
    python -m dit.export outputs/in256 -o exports/in256 --format diffusers --vae stabilityai/sd-vae-ft-ema
    python -m dit.export outputs/in256 -o exports/in256 --format diffusers --push me/dit-xl2-in256

The source is a training run directory (its EMA export model/ when the run finished, else its latest
checkpoint), one of its checkpoints, or any model file dit.model_files.load_model reads. DIR gets:

- ``--format ours`` (default): our export (config.json, ema.safetensors, model.safetensors), loaded by
  dit.model_files.load_model and sample.py;
- ``--format diffusers``: a DiTPipeline directory (model_index.json with id2label, transformer/, vae/,
  scheduler/) that ``DiTPipeline.from_pretrained(DIR)`` loads and samples from as it is. Its scheduler is
  DPM-Solver++(2M) on the model's betas, dit's ``dpmpp`` sampler, so the pipeline and ``sample.py
  checkpoint=<source> sampler=dpmpp`` give the same images for the same seed. DiTPipeline hard-codes the null
  class as 1000: a model of K < 1000 classes gets a 1001-row label table (rows K..999 are copies of the null
  row, never a class) and K names in id2label. A model that cannot be a DiTPipeline (a pixel-space model:
  the pipeline always decodes through a VAE; a flow-matching model: its schedulers are DDPM-family epsilon
  schedulers; a block other than adaLN-Zero, or other backbone options; more than 1000 classes) is written
  in our format instead, with one line saying why and a loader note in the model card: the user asked to
  share the model, and gets a loadable export plus the reason. A model trained with DiT's timestep
  frequencies (model.timestep_freq_shift=0, our default) becomes a DiTPipeline that computes a slightly
  different function (diffusers hard-codes downscale_freq_shift=1, as in its conversion of the official DiT
  checkpoints): the export measures the difference, says it in one line and in the card.

Every export gets a model card, README.md with the Hub's metadata (dit.model_card), and the run's sample grid
of the exported step (samples.png). Writing is atomic (dit.atomic.atomic_dir): an existing DIR is refused
unless --overwrite, and is replaced only by a complete export. ``--push`` uploads DIR with huggingface_hub;
without a token or a connection it says so in one line and leaves the export where it is.

Exit codes: 0 written (and pushed); 1 an error, nothing written (one line ``error: ...`` naming the file);
2 written but not pushed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.atomic import atomic_dir
from dit.integrity import read_json
from dit.model_card import RunRecord, model_card
from dit.model_files import FORMAT, FSDP_WEIGHTS, export_config, load_model, objective_of, objective_settings
from dit.models import DiT
from dit.models.convert import diffusers_obstacle

__all__ = ["Source", "export", "main", "pipeline_obstacles", "push", "resolve_source"]

PIPELINE_NULL_CLASS = 1000  # DiTPipeline.__call__ guides with class_null = 1000, whatever the model
EXACT = 1e-4  # relative difference below which a converted transformer computes the model's function (fp32: ~1e-6)
EXIT_ERROR, EXIT_NOT_PUSHED = 1, 2
GRID_FILE = "samples.png"


@dataclasses.dataclass
class Source:
    """What is exported: the model files load_model reads, the run they belong to, the step they are at."""

    path: Path
    run_dir: Path | None = None
    step: int | None = None
    note: str | None = None  # said before exporting (e.g. an unfinished run: its latest checkpoint)


def _run_of(model_dir: Path) -> Path | None:
    """The training run a model directory belongs to (<run>/model, <run>/checkpoints/step_N), if any."""
    run = model_dir.parent.parent if model_dir.parent.name == "checkpoints" else model_dir.parent
    return run if (run / "metrics.jsonl").exists() or (run / ".hydra").exists() else None


def _step_of(model_dir: Path, run: Path | None) -> int | None:
    """The optimiser step of a checkpoint (trainer_state.json) or of a finished run's model/ (finished.json)."""
    if (model_dir / "trainer_state.json").exists():
        return int(read_json(model_dir / "trainer_state.json")["step"])
    if run is not None and model_dir == run / "model" and (run / "finished.json").exists():
        return int(read_json(run / "finished.json")["step"])
    match = re.fullmatch(r"step_(\d+)", model_dir.name)
    return int(match.group(1)) if match else None


def resolve_source(path: str | Path) -> Source:
    """A run directory -> its model/ if the run finished (or has no checkpoint), else its latest checkpoint;
    anything else is a model file or directory load_model reads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (a run directory, a checkpoint or an export)")
    if path.is_dir() and not (path / "config.json").exists() and not (path / "model_index.json").exists():
        checkpoints = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "config.json").exists())
        model = path / "model"
        if (model / "config.json").exists() and ((path / "finished.json").exists() or not checkpoints):
            return Source(model, path, _step_of(model, path))
        if checkpoints:
            step = _step_of(checkpoints[-1], path)
            note = f"{path} has not finished (no finished.json): exporting its latest checkpoint, step {step}"
            return Source(checkpoints[-1], path, step, note)
        if (path / "metrics.jsonl").exists() or (path / ".hydra").exists():
            raise FileNotFoundError(f"{path / 'model'} is missing: the run has neither an export nor a checkpoint")
    if path.is_dir():
        run = _run_of(path)
        return Source(path, run, _step_of(path, run))
    return Source(path)


def pipeline_obstacles(model: DiT, meta: dict) -> list[str]:
    """Why this model cannot be a DiTPipeline (empty: it can), each reason a clause naming it."""
    reasons = []
    if not meta.get("latent"):
        reasons.append("it generates pixels and DiTPipeline always decodes through a VAE (AutoencoderKL)")
    objective = objective_settings(meta)["name"]
    if objective == "flow":
        reasons.append(
            "it is a flow-matching model (velocity on t in [0, 1]) and DiTPipeline's schedulers are DDPM-family "
            "(epsilon on 1000 discrete timesteps)"
        )
    elif objective != "ddpm":
        reasons.append(f"its objective {objective!r} is not DDPM, the only one DiTPipeline's schedulers sample")
    if model.num_classes > PIPELINE_NULL_CLASS:
        reasons.append(f"it has {model.num_classes} classes and DiTPipeline hard-codes the null class as 1000")
    if why := diffusers_obstacle(model):
        reasons.append(why)
    return reasons


def pipeline_scheduler(meta: dict):
    """The DiTPipeline's scheduler: the DPM-Solver++ scheduler of dit's dpmpp sampler for this objective (one
    definition: sampling the export with diffusers is sampling it with `sample.py sampler=dpmpp`)."""
    from diffusers import DPMSolverMultistepScheduler

    from dit.diffusion import SamplingSettings, build_sampler

    sampler = build_sampler(objective_of(meta), SamplingSettings(sampler="dpmpp"))
    return DPMSolverMultistepScheduler.from_config(sampler.scheduler.config)


def _load_vae(spec: str, in_channels: int):
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(spec)
    except Exception as e:  # a missing path, no network for a hub id, not an AutoencoderKL
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"cannot load the VAE {spec!r} ({type(e).__name__}: {first}): "
            "give --vae <AutoencoderKL directory or hub id>"
        ) from None
    if vae.config.latent_channels != in_channels:
        raise ValueError(f"the VAE {spec!r} has {vae.config.latent_channels} latent channels, the model {in_channels}")
    return vae.eval()


def _probe_difference(model: DiT, transformer) -> tuple[float, float]:
    """(max |difference|, max |output|) of the model and the pipeline's transformer on a probe batch: four
    latents at timesteps across the chain, classes and the null class (1000 in the pipeline)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.tensor([0, 333, 666, 999])
    k = model.num_classes
    y = torch.tensor([0, k // 2, k - 1, k])
    with torch.no_grad():
        ours = model.eval()(x, t, y)
        theirs = transformer.eval()(x, t, torch.where(y == k, PIPELINE_NULL_CLASS, y)).sample
    return (ours - theirs).abs().max().item(), ours.abs().max().item()


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' progress bars and warnings off while the export is written and checked: they are about its own
    loading (e.g. id2label's JSON keys being strings, as in every DiTPipeline on the Hub), not about the export."""
    from diffusers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _write_diffusers(tmp: Path, model: DiT, meta: dict, vae_spec: str) -> str | None:
    """A DiTPipeline in tmp; returns how it differs from the model (None: it computes the same function)."""
    from diffusers import DiTPipeline

    from dit.models.convert import to_diffusers

    with warnings.catch_warnings(), _quiet_diffusers():  # the timestep-frequency warning: measured and said below
        warnings.simplefilter("ignore")
        transformer = to_diffusers(model, num_embeds=PIPELINE_NULL_CLASS)
        pipe = DiTPipeline(
            transformer=transformer, vae=_load_vae(vae_spec, model.in_channels), scheduler=pipeline_scheduler(meta)
        )
        pipe.save_pretrained(tmp)
        index = read_json(tmp / "model_index.json")
        if meta.get("class_names"):  # DiTPipeline takes id2label from model_index.json (pipe.labels, get_label_ids)
            index["id2label"] = {str(i): name for i, name in enumerate(meta["class_names"])}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        loaded = DiTPipeline.from_pretrained(tmp)  # as a user loads it
    diff, scale = _probe_difference(model, loaded.transformer)
    if diff <= EXACT * max(scale, 1.0):
        return None
    c, causes = model.config, []
    if c.timestep_freq_shift != 1:
        causes.append(
            f"diffusers' DiT embeds timesteps with downscale_freq_shift=1 and this model was trained with "
            f"timestep_freq_shift={c.timestep_freq_shift} (a model trained with model.timestep_freq_shift=1 "
            "exports exactly)"
        )
    if c.norm_eps != 1e-6:
        causes.append(f"diffusers' DiT normalises before attention with eps 1e-6 and this model with {c.norm_eps}")
    why = "; ".join(causes) or "a conversion difference dit does not know of (please report it)"
    return (
        f"The DiTPipeline's transformer computes a slightly different function than the model: its outputs differ by "
        f"up to {diff:.2g} (outputs up to {scale:.2g}) on a probe batch, because {why}. `--format ours` keeps the "
        "model exact."
    )


def _export_config(source: Source, model: DiT, meta: dict, vae: str | None) -> dict:
    """The export's config.json: the source's own (init_from and all) when it is ours, else ours built from what
    load_model found (an official .pt, a diffusers directory); --vae recorded as the VAE."""
    if meta.get("format") == FORMAT:
        config = read_json(source.path / "config.json")
    else:
        config = export_config(
            model, objective_settings(meta), {k: meta.get(k) for k in ("class_names", "latent", "vae")}
        )
    if vae:
        config.setdefault("data", {})["vae"] = vae
    return config


def _write_ours(tmp: Path, source: Source, model: DiT, meta: dict, config: dict) -> None:
    """config.json, the EMA weights (ema.safetensors) and the raw ones (model.safetensors) where the source has
    them; a source without EMA weights gives model.safetensors alone."""
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if Path(meta.get("weights", "")).name != "ema.safetensors":
        files = {"model.safetensors": model}
    else:
        files = {"ema.safetensors": model}
        if any((source.path / name).exists() for name in ("model.safetensors", FSDP_WEIGHTS)):
            files["model.safetensors"] = load_model(source.path, use_ema=False)[0]
    for name, weights in files.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.state_dict().items()}, tmp / name)


def export(
    source_path: str | Path,
    out: str | Path,
    fmt: str = "ours",
    *,
    vae: str | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    dataset: str | None = None,
    license: str | None = None,
    say=print,
) -> tuple[Path, str]:
    """Write the export; returns (its directory, the format written: "ours" or "diffusers"). say: where the
    notes go (one line each)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it (only by a complete export)")
    source = resolve_source(source_path)
    if source.note:
        say(f"note: {source.note}")
    model, meta = load_model(source.path)
    model.eval()
    run = RunRecord.read(source.run_dir, source.step)
    notes, written = [], fmt
    if fmt == "diffusers" and (reasons := pipeline_obstacles(model, meta)):
        written = "ours"
        why = "; ".join(reasons)
        say(f"note: {source.path} cannot be a diffusers DiTPipeline: {why}; writing --format ours instead")
        notes.append(
            f"**Not a diffusers DiTPipeline**: {why}. This is a dit export instead: load it with dit "
            "(`dit.model_files.load_model`, or `sample.py` below), not with diffusers."
        )
    vae_spec = vae or meta.get("vae")
    if written == "diffusers" and not vae_spec:
        raise ValueError(f"{source.path}: a latent model whose config names no VAE; pass --vae <AutoencoderKL>")
    config = _export_config(source, model, meta, vae)
    with atomic_dir(out) as tmp:
        if written == "diffusers":
            if difference := _write_diffusers(tmp, model, meta, vae_spec):
                say(f"warning: {difference}")
                notes.append(f"**Note**: {difference}")
        else:
            _write_ours(tmp, source, model, meta, config)
        if run.grid is not None:
            shutil.copyfile(run.grid, tmp / GRID_FILE)
        card = model_card(
            model=model, config=config, run=run, library="diffusers" if written == "diffusers" else "dit",
            export_dir=str(out), repo_id=repo_id, grid_file=GRID_FILE if run.grid else None, notes=tuple(notes),
            dataset=dataset, license=license,
        )  # fmt: skip
        card.save(tmp / "README.md")
    return out, written


def push(out: Path, repo_id: str, private: bool = False) -> str | None:
    """Upload the export to the Hub repo (created if needed); returns why it was not pushed (None: pushed)."""
    import httpx
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    missing = []
    if (token := get_token()) is None:
        missing.append("no Hugging Face token (`hf auth login` or HF_TOKEN)")
    if constants.HF_HUB_OFFLINE:
        missing.append("offline mode is on (HF_HUB_OFFLINE=1)")
    if missing:
        return " and ".join(missing)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=out, repo_id=repo_id, commit_message=f"dit export of {out.name}")
    except OfflineModeIsEnabled:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    except HfHubHTTPError as e:
        return f"the Hub refused it ({str(e).strip().splitlines()[0]})"
    except (httpx.HTTPError, OSError) as e:
        return f"no connection to the Hub ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''})"
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.export",
        description="Export a trained model to share it: our format or a diffusers DiTPipeline, with a model card "
        "(README.md with the Hub's metadata, built from the run), optionally pushed to the Hugging Face Hub.",
        epilog="--format diffusers writes a DiTPipeline (DPM-Solver++ scheduler = sample.py sampler=dpmpp). A model "
        "that cannot be one (pixel space: the pipeline always decodes through a VAE; flow matching: its schedulers "
        "are DDPM-family; a block other than adaln_zero or other backbone options; more than 1000 classes) is "
        "written in our format instead, with one line saying why and a loader note in the card. Exit codes: 0 "
        "written (and pushed), 1 error (nothing written), 2 written but not pushed.",
    )
    p.add_argument("source", help="a training run directory (model/ if finished, else its latest checkpoint), "
                                  "a checkpoint, an export, an official DiT .pt or a diffusers directory")  # fmt: skip
    p.add_argument("-o", "--out", required=True, help="the export directory to write (refused if it exists)")
    p.add_argument("--format", choices=("ours", "diffusers"), default="ours", help="what to write (default: ours)")
    p.add_argument("--vae", help="latent models: the AutoencoderKL (directory or hub id) the latents decode with; "
                                 "default: the one the model's config names")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR (once the new export is complete)")
    p.add_argument("--push", metavar="REPO_ID", help="upload the export to this Hugging Face Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--dataset", help="the card's Hub dataset id (default: known for fashion_mnist)")
    p.add_argument("--license", help="the card's license id, e.g. mit, apache-2.0, cc-by-nc-4.0 (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def say(line):
        print(line, file=sys.stderr)

    try:
        out, written = export(
            args.source, args.out, args.format, vae=args.vae, overwrite=args.overwrite, repo_id=args.push,
            dataset=args.dataset, license=args.license, say=say,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        say(f"error: {e}")
        return EXIT_ERROR
    print(
        f"wrote {out} ({'a diffusers DiTPipeline' if written == 'diffusers' else 'dit export'}, model card README.md)"
    )
    if args.push:
        if why := push(out, args.push, args.private):
            say(f"not pushed to {args.push}: {why}; the export is at {out}")
            return EXIT_NOT_PUSHED
        print(f"pushed {out} to https://huggingface.co/{args.push}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
