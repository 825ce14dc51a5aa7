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
"""The alignment benchmark at test size: train_inpo.py with its DEFAULT settings, on pairs labelled by a known reward,
must raise that reward over the base model, and the same pairs with the labels flipped (the control) must not.

Drives benchmarks/run_alignment.py end to end (pairs, train_inpo.py with the benchmark's flags, evaluation) on the
benchmark's base model as shipped in benchmarks/assets (README "Benchmarks: does it align?" says how it was built);
the control reuses its pair images. train_inpo.py runs inside the test process (conftest.launch) rather than through
the benchmark's `accelerate launch` subprocess: same flags and code, without a fresh interpreter's ~15 s of imports
per run (tests/test_train_sd.py and tests/test_copied_folder.py keep the real launcher covered).
"""

import os
import shutil
import time

from benchmarks import alignment_world as world
from benchmarks import run_alignment
from conftest import launch


ASSET = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "assets", "world_base_model"
)
# "default": no method flags, so whatever train_inpo.py defaults to is what is tested. lr and β as in the README's
# variant table.
RUN = [
    "--methods",
    "default",
    "--num_pairs",
    "96",
    "--num_inference_steps",
    "10",
    "--max_train_steps",
    "20",
    "--eval_every",
    "20",
    "--eval_seeds",
    "4",
    "--train_batch_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--beta_dpo",
    "5000",
]
MIN_WIN_RATE = 0.7  # of 48 paired samples (same prompt and initial noise); 0.5 ± 0.07 if training did nothing
MAX_FIDELITY_DROP = 0.15


def train_in_process(args, method, base_dir, pairs_dir, run_dir):
    """run_alignment.train, but train_inpo.py runs in this process; returns wall seconds."""
    command = run_alignment.train_command(args, method, base_dir, pairs_dir, run_dir)
    script = command.index(os.path.join(run_alignment.REPO_ROOT, "train_inpo.py"))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    start = time.time()
    launch("train_inpo.py", *command[script + 1 :])
    return time.time() - start


def run_small_benchmark(out_dir, seed=0, flipped=False):
    """The base model's and the default method's final evaluation rows ({mean_reward, win_rate, fidelity, ...})."""
    base_dir = os.path.join(out_dir, "base_model")
    if not os.path.isdir(base_dir):
        shutil.copytree(ASSET, base_dir)  # its fingerprint is BaseModelConfig()'s: run_alignment loads, not builds
    argv = [*RUN, "--seed", str(seed), "--out_dir", str(out_dir), *(["--flipped_labels"] if flipped else [])]
    results = run_alignment.main(argv, model_config=world.BaseModelConfig())
    return results["base"]["rows"][0], results["default"]["rows"][-1]


def test_default_settings_raise_the_reward_and_the_flipped_control_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(run_alignment, "train", train_in_process)
    base, tuned = run_small_benchmark(tmp_path)
    _, control = run_small_benchmark(tmp_path, flipped=True)
    assert tuned["win_rate"] > MIN_WIN_RATE, (base, tuned)
    assert tuned["mean_reward"] > base["mean_reward"], (base, tuned)
    assert tuned["fidelity"] > base["fidelity"] - MAX_FIDELITY_DROP, (base, tuned)
    assert control["mean_reward"] < base["mean_reward"], (base, control)
