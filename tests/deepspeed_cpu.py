# Copyright 2026 The InPO for diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Run a training script under DeepSpeed with CPU processes (gloo), for test_distributed.py.

accelerate maps DeepSpeed only onto GPU-class backends: on a CPU-only machine it reports one process while
DeepSpeed's own CPU accelerator runs all of them over gloo. This shim tells accelerate that the CPU's gloo backend
is the device backend, so the scripts' DeepSpeed path (engine wrapping, ZeRO-2 optimizer, checkpoint save/load,
final export) runs for real. Usage (ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_DEEPSPEED_* in the environment):

    torchrun --nproc_per_node 2 tests/deepspeed_cpu.py train_inpo.py ARGS...
"""

import importlib
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType


# DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (ninja + g++, ~50 s) in every new environment,
# an op that only speeds up its allreduce; without it the collectives go through gloo, which is what these tests
# check. The module is looked up by its full name because `deepspeed.comm.torch` as an attribute is torch itself
# (deepspeed.comm re-exports it), where a patch would change nothing.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
    "gloo",
    DistributedType.MULTI_CPU,
)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
