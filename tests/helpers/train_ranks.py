"""Run a short training in each process of a distributed launch and save that rank's parameters.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/helpers/train_ranks.py <run_dir> <overrides...>
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
        tests/helpers/train_ranks.py --fsdp-on-cpu <run_dir> <overrides...>

Writes params_rank<R>.safetensors (or, sharded, shards_rank<R>.json) and launch_rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

args = sys.argv[1:]
if args[0] == "--fsdp-on-cpu":
    sys.path.insert(0, str(Path(__file__).parent))
    import cpu_fsdp

    cpu_fsdp.enable()
    args = args[1:]
run_dir = Path(args[0])
with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
    cfg = compose("train", overrides=args[1:])
result = train.run(cfg, run_dir)
rank = int(os.environ.get("RANK", 0))  # the process group is gone after training ends
launch = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")}  # GROUP_RANK: the node
(run_dir / f"launch_rank{rank}.json").write_text(json.dumps(launch))
params = dict(result["model"].named_parameters())
if any(hasattr(p, "to_local") for p in params.values()):
    # Sharded (FSDP): the gathered weights are the run's model/ export; record this rank's shard sizes.
    shards = {k: [p.numel(), p.to_local().numel()] for k, p in params.items()}
    (run_dir / f"shards_rank{rank}.json").write_text(json.dumps(shards))
else:
    save_file(
        {k: v.contiguous() for k, v in result["model"].state_dict().items()}, run_dir / f"params_rank{rank}.safetensors"
    )
