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
"""Faults and resume: non-finite steps, kills, atomic checkpoints, mixed precision across resume, secrets."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_inpo
from conftest import REPO, launch, read_scalars, tiny_run_args
from fixtures import build_tiny_sd


HUGE_BETA = "1e39"  # overflows float32: inside = −½β·0 is NaN at step 1 (policy == reference)


def lora(output_dir):
    return load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_with_the_step_and_metrics(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, beta_dpo=HUGE_BETA), check=False)
    assert result.returncode != 0
    assert "Non-finite loss or gradient at optimizer step 1 (mean timestep" in result.stderr
    assert "the last good checkpoint is none" in result.stderr and "--skip_nonfinite_steps" in result.stderr
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_skip_nonfinite_steps_tolerates_a_few(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = launch(
        "train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=3, beta_dpo=HUGE_BETA, skip_nonfinite_steps=3)
    )
    assert result.stderr.count("Skipped optimizer step") == 3
    assert read_scalars(out, "skipped_nonfinite_steps") == {1: 1.0, 2: 2.0, 3: 3.0}
    # No update was applied: the zero-initialised LoRA up-weights are still zero.
    assert all(v.abs().max() == 0 for k, v in lora(out).items() if "lora_B" in k or "lora.up" in k)


def test_non_finite_step_leaves_the_last_good_checkpoint_alone(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, checkpointing_steps=1))
    checkpoint = os.path.join(out, "checkpoint-2")
    before = {name: os.stat(os.path.join(checkpoint, name)).st_mtime_ns for name in os.listdir(checkpoint)}
    result = launch(
        "train_inpo.py",
        *tiny_run_args(
            tiny_sd, pickapic, out, steps=4, checkpointing_steps=1, beta_dpo=HUGE_BETA, resume_from_checkpoint="latest"
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "at optimizer step 3" in result.stderr and "the last good checkpoint is checkpoint-2" in result.stderr
    assert train_inpo.list_checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    assert {name: os.stat(os.path.join(checkpoint, name)).st_mtime_ns for name in os.listdir(checkpoint)} == before


def test_half_written_checkpoint_is_never_picked_as_latest(tmp_path):
    os.makedirs(tmp_path / "checkpoint-2")
    os.makedirs(tmp_path / ".partial-checkpoint-4")  # what a kill during save leaves behind
    assert train_inpo.resolve_resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    os.makedirs(tmp_path / "checkpoint-10")
    assert train_inpo.list_checkpoints(str(tmp_path)) == ["checkpoint-2", "checkpoint-10"]  # numeric order
    assert train_inpo.prune_checkpoints(str(tmp_path), total_limit=2) == ["checkpoint-2"]


def test_kill_9_then_resume_latest_equals_uninterrupted_run(tiny_sd, pickapic, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    args = tiny_run_args(tiny_sd, pickapic, out, steps=6, checkpointing_steps=2)
    command = [sys.executable, os.path.join(REPO, "train_inpo.py"), *args]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True
    )
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(out, "checkpoint-2")) and time.time() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    result = launch("train_inpo.py", *args, "--resume_from_checkpoint", "latest")
    assert "Resuming from" in result.stdout + result.stderr
    assert_same_lora(lora(out), lora(uninterrupted))


def test_bf16_resume_keeps_fp32_lora_and_the_loss_trajectory(tiny_sd, pickapic, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    # 16 px (8x8 latents): bf16 convolutions run 30x slower than fp32 on CPUs without bf16 instructions.
    common = {"mixed_precision": "bf16", "checkpointing_steps": 2, "resolution": 16}
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, full, steps=4, **common))
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, steps=2, **common))
    launch(
        "train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, steps=4, resume_from_checkpoint="latest", **common)
    )
    resumed, straight = lora(part), lora(full)
    assert {v.dtype for v in resumed.values()} == {torch.float32}  # trainable params stayed fp32 after load_state
    assert_same_lora(resumed, straight)
    full_losses, part_losses = read_scalars(full, "loss"), read_scalars(part, "loss")
    for step in (3, 4):
        assert part_losses[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_output_dir_of_another_run_is_refused(tiny_sd, pickapic, uninterrupted, tmp_path):
    other = tiny_run_args(tiny_sd, pickapic, uninterrupted, rank=8, resume_from_checkpoint="latest")
    result = launch("train_inpo.py", *other, check=False)
    assert result.returncode != 0
    assert (
        "holds checkpoints of a run with other settings" in result.stderr and "rank: that run has 4" in result.stderr
    )
    fresh = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, uninterrupted), check=False)
    assert fresh.returncode != 0 and "pass --resume_from_checkpoint latest" in fresh.stderr


def test_missing_subfolder_is_named(tiny_sd, tmp_path):
    import shutil

    model = str(tmp_path / "model")
    shutil.copytree(tiny_sd, model)
    shutil.rmtree(os.path.join(model, "vae"))
    args = train_inpo.parse_args(tiny_run_args(model, "data", str(tmp_path / "o")))
    with pytest.raises(ValueError, match=r"lacks the subfolder\(s\) \['vae'\]"):
        train_inpo.check_local_pipeline(args)


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    from diffusers import UNet2DConditionModel

    model = build_tiny_sd(str(tmp_path / "model"))
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    os.remove(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors"))
    unet.save_pretrained(os.path.join(model, "unet"), safe_serialization=False)  # a pickle .bin
    args = train_inpo.parse_args(tiny_run_args(model, "data", str(tmp_path / "o")))
    with pytest.raises(OSError, match="safetensors"):
        train_inpo.load_unet(args)
    allowed = train_inpo.parse_args(
        tiny_run_args(model, "data", str(tmp_path / "o"), allow_unsafe_pickle_weights=True)
    )
    assert train_inpo.load_unet(allowed) is not None


def test_hub_token_never_reaches_logs_trackers_or_model_card(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    secret = "hf_THIS_IS_NOT_A_REAL_TOKEN"
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=1, hub_token=secret))
    assert secret not in result.stdout + result.stderr
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(root, name)
