#!/usr/bin/env bash
# Every GPU check and measurement the issues name, in parts that each fit one device call (< 10 min).
#
#   bash benchmarks/gpu_wheels.sh                   # on the dev machine, once: .whl/ (hydra, omegaconf, diffusers)
#   device run, carry [".whl"]:  bash benchmarks/gpu_all.sh tests     # GPU tests: compiled kernels, compile, models
#                                bash benchmarks/gpu_all.sh kernel    # make bench-kernel: op table + DiT-XL/2 fused vs not
#                                bash benchmarks/gpu_all.sh train     # DiT-XL/2 bf16 images/s, MFU, peak memory
#                                bash benchmarks/gpu_all.sh sample    # DiT-XL/2 250 steps vs DiTPipeline
#                                bash benchmarks/gpu_all.sh launch    # DDP and FSDP2 configs on this GPU, bf16 + compile
#
# Everything goes to $OUT/<part>.log (or ./gpu-results); the end of each log is printed last.
set -uo pipefail
part=${1:?"usage: benchmarks/gpu_all.sh tests|kernel|train|sample|launch"}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then  # the GPU image lacks these pure-Python packages (benchmarks/gpu_wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
log="$OUT/$part.log"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'accelerate', accelerate.__version__)"
} > "$log" 2>&1
# Dense bf16 peak for MFU: H100/H200 SXM 989 TFLOP/s, H100 PCIe 756.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *PCIe*) peak=756 ;;
  *) peak=989 ;;
esac

case "$part" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m "" tests/test_ops.py tests/test_models.py tests/test_interop.py >> "$log" 2>&1 ;;
  kernel)
    python3 benchmarks/bench_kernel.py >> "$log" 2>&1 ;;
  train)
    python3 benchmarks/bench_train.py --model DiT-XL/2 --batch 64 --precision bf16 --steps 20 --warmup 5 \
      --variants eager,compile,ckpt,compile+ckpt --peak-tflops "$peak" >> "$log" 2>&1 ;;
  sample)
    python3 benchmarks/bench_sample.py --model DiT-XL/2 --steps 250 --batch 64 --repeats 2 >> "$log" 2>&1 ;;
  launch)
    imgs=/tmp/dit-imgs
    python3 - "$imgs" <<'EOF' >> "$log" 2>&1
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for c in range(4):
    (Path(sys.argv[1]) / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(Path(sys.argv[1]) / f"class{c}" / f"{i}.png")
EOF
    common=(experiment=smoke data=imagefolder "data.dataset.root=$imgs" data.dataset.image_size=32 data.limit=null
            model=dit_s4 training.mixed_precision=bf16 training.ckpt_every=10 training.log_every=5)
    failed=0
    for cfg in ddp fsdp; do
      for variant in eager compiled; do
        flags=(training.compile=false)
        [ "$variant" = compiled ] && flags=(training.compile=true training.gradient_checkpointing=true)
        for steps in 20 30; do  # the second launch resumes from the first one's checkpoint
          echo "== $cfg $variant ${flags[*]} total_steps=$steps" >> "$log"
          accelerate launch --config_file "configs/accelerate/$cfg.yaml" --num_processes 1 train.py "${common[@]}" \
            "${flags[@]}" "training.total_steps=$steps" "hydra.run.dir=/tmp/dit-runs/$cfg-$variant" >> "$log" 2>&1 || failed=1
          grep -h '"step": '"$steps"',' "/tmp/dit-runs/$cfg-$variant/metrics.jsonl" >> "$log" 2>/dev/null
        done
      done
    done
    [ $failed = 0 ] ;;
  *)
    echo "unknown part $part" >&2; exit 2 ;;
esac
rc=$?
tail -n 60 "$log"
exit $rc
