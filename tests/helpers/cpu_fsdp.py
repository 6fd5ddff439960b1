"""Run Accelerate's real FSDP2 code path on CPU processes (gloo), for tests only.

Accelerate turns FSDP on only for accelerator devices: on a CPU-only machine `accelerate launch
--config_file configs/accelerate/fsdp.yaml` exports the FSDP settings (ACCELERATE_USE_FSDP,
FSDP_VERSION=2, FSDP_TRANSFORMER_CLS_TO_WRAP, ...) but the state comes up as MULTI_CPU, i.e. DDP.
`enable()` promotes that state to FSDP with a plugin built from those same variables, so
`accelerator.prepare` applies torch's `fully_shard` (which supports CPU meshes) exactly as on GPUs.
"""

import os


def enable() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with --config_file configs/accelerate/fsdp.yaml"
    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                self.fsdp_plugin.set_mixed_precision(self._mixed_precision)

    AcceleratorState.__init__ = init
