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
"""The folder works when copied into diffusers' examples tree and launched from the checkout's root."""

import os
import shutil
import subprocess
import sys

from conftest import REPO, tiny_run_args


FOLDER_FILES = (
    "train_inpo.py",
    "train_inpo_sdxl.py",
    "train_inpo_sd3.py",
    "inpo_utils.py",
    "requirements.txt",
    "README.md",
)


def test_copied_folder_trains_from_another_working_directory(tiny_sd, pickapic, tmp_path):
    checkout = tmp_path / "diffusers"
    folder = checkout / "examples" / "research_projects" / "inpo"
    folder.mkdir(parents=True)
    for name in FOLDER_FILES:
        shutil.copy(os.path.join(REPO, name), folder / name)
    out = tmp_path / "out"
    script = os.path.join("examples", "research_projects", "inpo", "train_inpo.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += ["--num_cpu_threads_per_process", "1", script, *tiny_run_args(tiny_sd, pickapic, str(out), steps=2)]
    # Nothing but the copied folder to import from; bytecode written, to see below where inpo_utils came from.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Steps: 100%" in result.stderr
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
    # The helpers came from the copy, not from this repository.
    assert any(name.startswith("inpo_utils.") for name in os.listdir(folder / "__pycache__"))
