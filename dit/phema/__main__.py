"""Post-hoc EMA from the command line: the EMA of any width, at any snapshot's step, after training.

    python -m dit.phema outputs/<run> --list                                  # the snapshots and their steps
    python -m dit.phema outputs/<run> --sigma-rel 0.05 0.10 0.15              # exports at the last snapshot
    python -m dit.phema outputs/<run> --sigma-rel 0.02 0.03 ... --step 1000 -o exports/

Each width becomes an export directory (what sample.py, dit.demo and dit.hub.export load):
<out>/phema-step_XXXXXXX-sigma_rel_0.050/ (default out: <run>/phema_exports), its config.json recording
"ema": {"kind": "power", "sigma_rel", "step", "snapshots"}. The run must have been trained with
training.phema_sigma_rels and training.phema_snapshot_every. One line per export on stdout; errors are one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dit.hub import ModelRecord, load_model, save_export
from dit.integrity import load_state_dict_checked
from dit.phema import find_snapshots, reconstruct


def export_name(step: int, sigma_rel: float) -> str:
    return f"phema-step_{step:07d}-sigma_rel_{sigma_rel:.3f}"


def source_model(run: Path):
    """The run's architecture and record: its final export (model/), else its newest checkpoint (step_* directories
    are zero-padded: by name is by step; a hidden one being written is skipped)."""
    for path in [run / "model", *sorted((run / "checkpoints").glob("step_*"), reverse=True)]:
        if (path / "config.json").is_file():
            return load_model(path)
    raise FileNotFoundError(f"{run}: no export (model/) or checkpoint to take the architecture from")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.phema", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory trained with training.phema_sigma_rels")
    p.add_argument("--sigma-rel", type=float, nargs="+", default=None, help="relative EMA widths (EDM2: 0.05-0.2)")
    p.add_argument("--step", type=int, default=None, help="a snapshot's step (default: the last)")
    p.add_argument("-o", "--out", type=Path, default=None, help="where the exports go (default: <run>/phema_exports)")
    p.add_argument("--list", action="store_true", help="list the snapshots and stop")
    args = p.parse_args(argv)
    try:
        snapshots = find_snapshots(args.run)
        if args.list or not args.sigma_rel:
            steps = sorted({s.step for s in snapshots})
            widths = sorted({s.sigma_rel for s in snapshots})
            print(f"snapshots={len(steps)} steps={','.join(map(str, steps))} sigma_rels={','.join(map(str, widths))}")
            return
        weights, coefficients, used = reconstruct(snapshots, args.sigma_rel, args.step)
        step = max(s.step for s in used)
        model, meta = source_model(args.run)
        out = args.out or args.run / "phema_exports"
        for sigma_rel, state in weights.items():
            load_state_dict_checked(model, state, used[-1].path)
            ema = {"kind": "power", "sigma_rel": sigma_rel, "step": step, "snapshots": len({s.step for s in used})}
            record = ModelRecord(meta.get("objective") or {}, meta.get("data") or {}, meta.get("init_from"), ema)
            path = save_export(out / export_name(step, sigma_rel), model, record, ema=model)
            print(f"out={path} sigma_rel={sigma_rel} step={step} ema={json.dumps(ema, separators=(',', ':'))}")
    except (ValueError, OSError) as e:  # bad widths or step, damaged or missing files, a full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
