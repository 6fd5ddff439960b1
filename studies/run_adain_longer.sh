#!/usr/bin/env bash
# Is AdaIN's miss on pullovers in the conditioning study (docs/ablation.md) a matter of budget?
# AdaIN's three seeds, the study's settings (experiment=ablate_conditioning as one run each), trained
# on to 6,000 steps, a 1,000-sample FID with class consistency (overall, worst class, per class) every
# 1,000 steps. The study's learning rate is constant after 100 warm-up steps, so a run continued from
# the study's step-4,000 checkpoint follows the schedule of a 6,000-step run; where that checkpoint is
# not on disk (a fresh clone: checkpoints are not committed) the run trains from step 0 instead.
# Two runs at a time (JOBS), one thread each; the seeds may be given (run_adain_longer.sh 0 1).
# Results: studies/ablation_adain_6k/adain_seed{0,1,2}; a finished run is skipped (its finished.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
longer() {  # seed
  local seed=$1 dir=studies/ablation_adain_6k/adain_seed$1
  local start=studies/ablation_conditioning/adain_seed$1/checkpoints/step_0004000 resume=auto
  if ! ls "$dir"/checkpoints/step_* >/dev/null 2>&1 && [ -f "$start/config.json" ]; then resume=$start; fi
  mkdir -p "$dir"
  $PY train.py experiment=ablate_conditioning hydra.mode=RUN model.block=adain seed="$seed" \
    training.total_steps=6000 training.fid_every=1000 training.fid_samples=1000 training.fid_final_samples=1000 \
    resume="$resume" hydra.run.dir="$dir" > "$dir/console.log" 2>&1 \
    || { echo "adain seed $seed failed: see $dir/console.log" >&2; return 1; }
  echo "adain seed $seed: done ($dir)"
}
# seeds as arguments (default 0 1 2), JOBS at a time (default 2)
pids=()
for seed in ${@:-0 1 2}; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || true; done
  longer "$seed" & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
