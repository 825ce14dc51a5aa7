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
"""utils/check_copies.py: the marked copies in train_inpo_sdxl.py and train_inpo_sd3.py match
train_inpo.py, and drift is caught and fixed."""

import os
import shutil
import subprocess
import sys

from conftest import REPO


CHECK = os.path.join(REPO, "utils", "check_copies.py")


def check_copies(*args):
    return subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True, check=False)


def test_the_repository_has_no_drifted_copies():
    result = check_copies("--repo", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("train_inpo_sdxl.py", "train_inpo_sd3.py"):
        with open(os.path.join(REPO, name)) as f:
            assert f.read().count("# Copied from train_inpo.") > 20


def test_a_drifted_copy_fails_and_fix_rewrites_it(tmp_path):
    for name in ("train_inpo.py", "train_inpo_sdxl.py", "train_inpo_sd3.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    sdxl = tmp_path / "train_inpo_sdxl.py"
    original = sdxl.read_text()
    marker = "# Copied from train_inpo.collate_pairs\n"
    assert marker in original
    drifted = original.replace(
        '"""Batch B pairs as 2B rows, winners first.', '"""Batch B pairs as 2B rows, losers first.', 1
    )
    # A replacement suffix is applied to the original before the comparison; a copy without it differs.
    drifted = drifted.replace(
        "# Copied from train_inpo.register_checkpoint_hooks with StableDiffusionPipeline->StableDiffusionXLPipeline",
        "# Copied from train_inpo.register_checkpoint_hooks",
    )
    assert drifted != original
    sdxl.write_text(drifted)

    result = check_copies("--repo", str(tmp_path))
    assert result.returncode == 1
    assert "train_inpo.collate_pairs differs" in result.stdout
    assert "train_inpo.register_checkpoint_hooks differs" in result.stdout
    assert "train_inpo.find_problem" not in result.stdout  # only the drifted copies are listed

    assert check_copies("--repo", str(tmp_path), "--fix").returncode == 0
    fixed = sdxl.read_text()
    assert "winners first." in fixed and "losers first." not in fixed
    assert "StableDiffusionPipeline.save_lora_weights" in fixed  # rewritten without the replacement
    assert check_copies("--repo", str(tmp_path)).returncode == 0


def test_a_marker_naming_no_original_fails(tmp_path):
    for name in ("train_inpo.py", "train_inpo_sdxl.py", "train_inpo_sd3.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    sdxl = tmp_path / "train_inpo_sdxl.py"
    sdxl.write_text(
        sdxl.read_text() + "\n\n# Copied from train_inpo.no_such_function\ndef no_such_function():\n    pass\n"
    )
    result = check_copies("--repo", str(tmp_path))
    assert result.returncode == 1 and "has no top-level 'no_such_function'" in result.stdout
