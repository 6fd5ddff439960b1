"""A study's committed results and its sweep directory: publish the one into the other, and back.

    python -m dit.analysis.study publish outputs/studies/ablation_conditioning studies/ablation_conditioning
    python -m dit.analysis.study restore studies/ablation_conditioning outputs/studies/ablation_conditioning

A study (studies/<name>/: README.md, runs/, report.md) is trained into an ignored sweep directory
(outputs/studies/<name>/, one sub-directory per run, with weights and checkpoints). ``publish`` copies into
studies/<name>/runs/<run>/ exactly the results of each run: metrics.jsonl, finished.json, error.txt, the
Hydra config and overrides, the result files (*.json, *.md, per_class_cfg*.json, a sampler study's results),
the curves (fid.png, loss.png) and the final sample grid -- no weights, checkpoints, npz, logs, empty files or
byte copies of another PNG (samples/latest.png is one of its last step_*.png). A run already published with the
same finished.json and metrics.jsonl is left as it is (a re-run of a finished run rewrites only its .hydra/).

``restore`` is the way back, for a fresh clone: each finished run's published files are copied into the sweep
directory where missing, so that a sweep meets its finished.json there and trains only the runs not finished.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
from pathlib import Path

from dit.atomic import atomic_dir, atomic_file
from dit.training.run import FINISHED

HYDRA = (".hydra/config.yaml", ".hydra/overrides.yaml")  # what dit.analysis.report and tests/test_studies.py read
KEPT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".png")
SKIPPED_DIRS = {"model", "checkpoints", "tracking", "fid_samples", ".hydra"}  # .hydra: only HYDRA is kept


def results(run: Path) -> list[Path]:
    """The files of a run directory that are results, relative to it (see the module's docstring)."""
    files = [Path(h) for h in HYDRA if (run / h).is_file()]
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run)
        if SKIPPED_DIRS & set(rel.parts[:-1]) or path.suffix not in KEPT_SUFFIXES or path.stat().st_size == 0:
            continue
        if rel.parts[0] == "samples" and path.name == "latest.png":
            continue
        files.append(rel)
    grids = sorted(f for f in files if f.parts[0] == "samples" and f.name.startswith("step_"))
    files = [f for f in files if f not in grids[:-1]]  # of the sample grids, the final one
    pngs: list[Path] = []
    # no byte copy of a PNG already kept; the sample grids first (what dit.analysis.report shows)
    for f in sorted((f for f in files if f.suffix == ".png"), key=lambda f: f.parts[0] != "samples"):
        if any(filecmp.cmp(run / f, run / kept, shallow=False) for kept in pngs):
            files.remove(f)
        else:
            pngs.append(f)
    return files


def same_record(src: Path, dst: Path) -> bool:
    """Both directories hold the same finished run: identical finished.json and metrics.jsonl."""
    names = (FINISHED, "metrics.jsonl")
    return all((src / n).is_file() and (dst / n).is_file() for n in names) and all(
        filecmp.cmp(src / n, dst / n, shallow=False) for n in names
    )


def publish(sweep: Path, study: Path) -> list[str]:
    """Copy the results of every run under `sweep` into study/runs/<run>/ (replacing what was there); returns
    one line per run saying what was done."""
    sweep = Path(sweep)
    runs = sorted(d for d in sweep.iterdir() if d.is_dir() and results(d)) if sweep.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{sweep}: no run directories with results")
    done = []
    for run in runs:
        dst = Path(study) / "runs" / run.name
        if same_record(run, dst):
            done.append(f"{run.name}: unchanged")
            continue
        files = results(run)
        with atomic_dir(dst) as tmp:  # replaces what was there only once complete (a full disk: the old run kept)
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / rel, tmp / rel)
        state = "finished" if (run / FINISHED).exists() else "not finished"
        done.append(f"{run.name}: {len(files)} files ({state})")
    return done


def restore(study: Path, sweep: Path) -> list[str]:
    """Copy each finished published run's files into sweep/<run>/ where missing (nothing is overwritten)."""
    done = []
    for run in sorted(p.parent for p in (Path(study) / "runs").glob(f"*/{FINISHED}")):
        dst = Path(sweep) / run.name
        missing = [rel for rel in results(run) if not (dst / rel).exists()]
        for rel in missing:
            atomic_file(dst / rel, lambda tmp, src=run / rel: shutil.copy2(src, tmp))
        if missing:
            done.append(f"{run.name}: {len(missing)} files")
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.analysis.study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="copy a sweep's results into the study (studies/<name>/runs/)")
    pub.add_argument("sweep", type=Path)
    pub.add_argument("study", type=Path)
    pub.set_defaults(run=lambda a: publish(a.sweep, a.study))
    res = sub.add_parser("restore", help="copy the study's finished runs into its sweep directory where missing")
    res.add_argument("study", type=Path)
    res.add_argument("sweep", type=Path)
    res.set_defaults(run=lambda a: restore(a.study, a.sweep))
    args = p.parse_args(argv)
    try:
        lines = args.run(args)
    except OSError as e:  # FileNotFoundError, a full disk (dit.atomic.WriteFailed: what was published is kept)
        raise SystemExit(f"error: {e}") from None
    print("\n".join(lines) or "nothing to do")


if __name__ == "__main__":
    main()
