"""Run a short training in each process of a torchrun launch and save that rank's parameters.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/helpers/train_ranks.py <run_dir> <overrides...>
"""

import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

run_dir = Path(sys.argv[1])
with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[2:])
result = train.run(cfg, run_dir)
rank = int(os.environ.get("RANK", 0))  # the process group is gone after training ends
save_file({k: v.contiguous() for k, v in result["model"].state_dict().items()}, run_dir / f"params_rank{rank}.safetensors")
