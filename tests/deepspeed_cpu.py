"""Run a training script under DeepSpeed with CPU processes (gloo), for test_distributed.py.

accelerate maps DeepSpeed only onto GPU-class backends: on a CPU-only machine it reports one process while
DeepSpeed's own CPU accelerator runs all of them over gloo. This shim tells accelerate that the CPU's gloo backend
is the device backend, so the scripts' DeepSpeed path (engine wrapping, ZeRO-2 optimizer, checkpoint save/load,
final export) runs for real. Usage (ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_DEEPSPEED_* in the environment):

    torchrun --nproc_per_node 2 tests/deepspeed_cpu.py train_inpo.py ARGS...
"""

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType


PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
    "gloo",
    DistributedType.MULTI_CPU,
)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
