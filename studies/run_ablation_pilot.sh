#!/usr/bin/env bash
# The budget pilot for the conditioning study (docs/ablation.md, "The next budget"): seed 0 of three
# blocks that were not recognisable on every class at 2,000 steps, trained longer with the study's
# settings otherwise (experiment=ablate_conditioning as one run), a 1,000-sample FID with class
# consistency (overall, worst class, per class) every 1,000 steps. One thread per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
pilot() {  # block, steps
  $PY train.py experiment=ablate_conditioning hydra.mode=RUN model.block=$1 seed=0 training.total_steps=$2 \
    training.fid_every=1000 training.fid_samples=1000 training.fid_final_samples=1000 hydra.run.dir=studies/ablation_pilot/$1_$(($2 / 1000))k
}
case "${1:-all}" in
  in_context) pilot in_context 6000 ;;
  adaln) pilot adaln 5000 ;;
  adain) pilot adain 4000 ;;
  all) pilot in_context 6000; pilot adaln 5000; pilot adain 4000 ;;
esac
