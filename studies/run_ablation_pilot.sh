#!/usr/bin/env bash
# The budget pilot for the conditioning study (docs/ablation.md, "The next budget"): seed 0 of two
# blocks that were not recognisable on every class at 2,000 steps, trained longer with the study's
# settings otherwise (experiment=ablate_conditioning as one run), a 1,000-sample FID with class
# consistency (overall, worst class, per class) every 1,000 steps; and adaLN again in bf16 autocast
# (faster on this CPU) against its fp32 run. One thread per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
pilot() {  # block, steps, directory suffix, overrides...
  local block=$1 steps=$2 suffix=$3; shift 3
  $PY train.py experiment=ablate_conditioning hydra.mode=RUN model.block=$block seed=0 training.total_steps=$steps \
    training.fid_every=1000 training.fid_samples=1000 training.fid_final_samples=1000 \
    hydra.run.dir=studies/ablation_pilot/${block}_$((steps / 1000))k$suffix "$@"
}
case "${1:-all}" in
  in_context) pilot in_context 6000 "" ;;
  adaln) pilot adaln 5000 "" ;;
  adaln_bf16) pilot adaln 4000 _bf16 training.mixed_precision=bf16 ;;
  all) pilot in_context 6000 ""; pilot adaln 5000 ""; pilot adaln 4000 _bf16 training.mixed_precision=bf16 ;;
esac
