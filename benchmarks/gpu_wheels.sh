#!/usr/bin/env bash
# Prepare .whl/ in the repository root with the pure-Python packages that the lent GPU machine's
# image lacks. That image (Python 3.12, torch with CUDA, no network) has torch, triton, accelerate,
# timm, einops, numpy, scipy, safetensors, huggingface-hub, pillow, tqdm, rich and pytest, but not
# hydra-core, omegaconf, diffusers (nor wandb).
#
# Run once on the development machine (it needs PyPI):   bash benchmarks/gpu_wheels.sh [extra names]
# Extra names are downloaded too (e.g. wandb and its dependencies).
# Then carry ".whl" in the device run. benchmarks/gpu_all.sh installs it itself; any other command
# starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#     --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
# .whl/ is in .gitignore; keep it out of git status in older checkouts too.
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
  || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl hydra-core omegaconf diffusers importlib-metadata "$@"
# antlr4-python3-runtime 4.9.x (needed by omegaconf) exists only as a source archive: build its wheel here.
python3 -m pip wheel -q --no-deps -w .whl 'antlr4-python3-runtime==4.9.3'
ls -la .whl
