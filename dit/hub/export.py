"""Share a model: python -m dit.hub.export <run dir or checkpoint> -o DIR [--format ours|diffusers] [--push REPO_ID]

    python -m dit.hub.export outputs/fashion_mnist-dit_ti4-adaln_zero -o exports/fmnist           # ours
    python -m dit.hub.export outputs/in256 -o exports/in256 --format diffusers --vae stabilityai/sd-vae-ft-ema
    python -m dit.hub.export outputs/in256 -o exports/in256 --format diffusers --push me/dit-xl2-in256

The source is a training run directory (its EMA export model/ when the run finished, else its latest
checkpoint), one of its checkpoints, or any model file dit.hub.load_model reads. DIR gets:

- ``--format ours`` (default): our export (config.json, ema.safetensors, model.safetensors), loaded by
  dit.hub.load_model and sample.py;
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
  checkpoints): the export measures the difference, says it in one line and in the card (dit.hub.pipeline).

Every export gets a model card, README.md with the Hub's metadata (dit.hub.card), and the run's sample grid
of the exported step (samples.png). Writing is atomic (dit.atomic.atomic_dir): an existing DIR is refused
unless --overwrite, and is replaced only by a complete export. ``--push`` uploads DIR with huggingface_hub;
without a token or a connection it says so in one line and leaves the export where it is.

Exit codes: 0 written (and pushed); 1 an error, nothing written (one line ``error: ...`` naming the file);
2 written but not pushed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import httpx
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors.torch import save_file

from dit.atomic import atomic_dir
from dit.hub.card import HubMetadata, RunRecord, WrittenExport, model_card
from dit.hub.files import FORMAT, FSDP_WEIGHTS, ModelRecord, export_config, load_model, objective_settings
from dit.integrity import read_json
from dit.models import DiT

__all__ = ["Source", "export", "main", "push", "resolve_source"]

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


def _export_config(source: Source, model: DiT, meta: dict, vae: str | None) -> dict:
    """The export's config.json: the source's own (init_from and all) when it is ours, else ours built from what
    load_model found (an official .pt, a diffusers directory); --vae recorded as the VAE."""
    if meta.get("format") == FORMAT:
        config = read_json(source.path / "config.json")
    else:
        data = {k: meta.get(k) for k in ("class_names", "latent", "vae")}
        config = export_config(model, ModelRecord(objective_settings(meta), data))
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
    hub: HubMetadata | None = None,
    say=print,
) -> tuple[Path, str]:
    """Write the export; returns (its directory, the format written: "ours" or "diffusers"). hub: what the card
    tells the Hub (the repo it will be pushed to, dataset, license); say: where the notes go (one line each)."""
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
    if fmt == "diffusers":
        from dit.hub.pipeline import pipeline_obstacles, write_pipeline  # imports diffusers (seconds): only here

        if reasons := pipeline_obstacles(model, meta):
            written, why = "ours", "; ".join(reasons)
            say(f"note: {source.path} cannot be a diffusers DiTPipeline: {why}; writing --format ours instead")
            notes.append(
                f"**Not a diffusers DiTPipeline**: {why}. This is a dit export instead: load it with dit "
                "(`dit.hub.load_model`, or `sample.py` below), not with diffusers."
            )
    vae_spec = vae or meta.get("vae")
    if written == "diffusers" and not vae_spec:
        raise ValueError(f"{source.path}: a latent model whose config names no VAE; pass --vae <AutoencoderKL>")
    config = _export_config(source, model, meta, vae)
    with atomic_dir(out) as tmp:
        if written == "ours":
            _write_ours(tmp, source, model, meta, config)
        elif difference := write_pipeline(tmp, model, meta, vae_spec):
            say(f"warning: {difference}")
            notes.append(f"**Note**: {difference}")
        if run.grid is not None:
            shutil.copyfile(run.grid, tmp / GRID_FILE)
        library = "dit" if written == "ours" else "diffusers"
        contents = WrittenExport(library, str(out), GRID_FILE if run.grid else None, tuple(notes))
        model_card(model, config, run, contents, hub).save(tmp / "README.md")
    return out, written


def push(out: Path, repo_id: str, private: bool = False) -> str | None:
    """Upload the export to the Hub repo (created if needed); returns why it was not pushed (None: pushed)."""
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
        prog="python -m dit.hub.export",
        description="Export a trained model to share it: our format or a diffusers DiTPipeline, with a model card "
        "(README.md with the Hub's metadata, built from the run), optionally pushed to the Hugging Face Hub.",
        epilog="--format diffusers writes a DiTPipeline (DPM-Solver++ scheduler = sample.py sampler=dpmpp). A model "
        "that cannot be one (pixel space: the pipeline always decodes through a VAE; flow matching: its schedulers "
        "are DDPM-family; a block other than adaln_zero or other backbone options; more than 1000 classes) is "
        "written in our format instead, with one line saying why and a loader note in the card. Exit codes: 0 "
        "written (and pushed), 1 error (nothing written), 2 written but not pushed.",
    )
    sources = "a checkpoint, an export, an official DiT .pt or a diffusers directory"
    p.add_argument(
        "source", help=f"a training run directory (model/ if finished, else its latest checkpoint), {sources}"
    )
    p.add_argument("-o", "--out", required=True, help="the export directory to write (refused if it exists)")
    p.add_argument("--format", choices=("ours", "diffusers"), default="ours", help="what to write (default: ours)")
    vae = "latent models: the AutoencoderKL (directory or hub id) the latents decode with"
    p.add_argument("--vae", help=f"{vae}; default: the one the model's config names")
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
        hub = HubMetadata(repo_id=args.push, dataset=args.dataset, license=args.license)
        out, written = export(
            args.source, args.out, args.format, vae=args.vae, overwrite=args.overwrite, hub=hub, say=say
        )
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
