#!/usr/bin/env bash
# Issue 14's training-recipe study: make train's budget (experiment=fashion_mnist_cpu: DiT-Ti/4,
# 2,500 steps x batch 16) with the DDPM objective and with flow matching (uniform and logit-normal
# times), then each model evaluated the same way (500 samples, 25 steps, cfg 2, domain FID).
# Re-running resumes unfinished runs (resume=auto) and skips finished evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
arm() {  # name, overrides...
  local name=$1; shift
  [ -f studies/recipes/$name/model/config.json ] || $PY train.py experiment=fashion_mnist_cpu hydra.run.dir=studies/recipes/$name "$@"
}
case "${1:-all}" in
  all) for a in ddpm flow_uniform flow_logit_normal eval; do bash "$PWD/studies/run_recipes.sh" "$a"; done ;;
  ddpm) arm ddpm diffusion=ddpm ;;  # make train now trains flow: the DDPM arm names its objective
  flow_uniform) arm flow_uniform diffusion=flow training.grid_sampling.sampler=euler ;;
  flow_logit_normal) arm flow_logit_normal diffusion=flow diffusion.time_sampling=logit_normal training.grid_sampling.sampler=euler ;;
  eval)
    for name in ddpm flow_uniform flow_logit_normal; do
      [ -f studies/recipes/$name/model/config.json ] || continue
      samplers=ddim:25; [ $name = ddpm ] || samplers=euler:25
      $PY benchmarks/sampler_study.py --checkpoint studies/recipes/$name/model --samplers $samplers --num-images 500 \
        --cfg-scale 2 --out studies/recipes/$name/eval
    done ;;
esac
