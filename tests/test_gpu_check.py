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
"""benchmarks/gpu_check.py, the one script a session with a CUDA GPU runs, must work when one is lent: its CPU smoke
test runs every training path it times and checks every saved LoRA."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_smoke_test_runs_every_method_and_each_lora_changes_the_output(tmp_path):
    work = str(tmp_path / "gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--families", "sd", "--steps", "2"]
    result = subprocess.run(
        [*command, "--work_dir", work], capture_output=True, text=True, cwd=REPO, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = open(os.path.join(tmp_path, "gpu_check.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| tiny sd |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "default (online)",
        "default (online)",
        "default from the cache",
        "default from the cache",
        "Diffusion-DPO (--latent_source forward)",
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-1] == "", row  # no failure
        assert float(cells[-2]) > 0, row  # the saved LoRA loaded with load_lora_weights changes the UNet's output
