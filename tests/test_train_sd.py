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
"""End-to-end runs of train_inpo.py on a tiny SD pipeline, through `accelerate launch`."""

import math
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import train_inpo
from conftest import accelerate_launch, launch, read_scalars, tiny_run_args


def generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a red square", num_inference_steps=4, generator=generator, height=32, width=32, output_type="np"
    ).images


def assert_finite_losses(output_dir, steps):
    losses = read_scalars(output_dir, "loss")
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    accuracy = read_scalars(output_dir, "implicit_acc")
    assert all(0 <= v <= 1 for v in accuracy.values())
    return losses


def test_lora_run_writes_loadable_lora_that_changes_output(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    accelerate_launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=4))
    assert_finite_losses(out, 4)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    card = open(os.path.join(out, "README.md")).read()
    assert "β (beta_dpo) | 500.0" in card and tiny_sd in card

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    after = generate(pipe)
    assert np.abs(after - before).mean() > 1e-4


def test_8bit_adam_gradient_checkpointing_and_forward_noise(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch(
        "train_inpo.py",
        *tiny_run_args(
            tiny_sd, pickapic, out, steps=3, use_8bit_adam=True, gradient_checkpointing=True, latent_source="forward"
        ),
    )
    assert_finite_losses(out, 3)
    weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    # Gaussian-initialised A and zero-initialised B: B is non-zero only if 8-bit AdamW updated it.
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)


def test_full_fine_tune_saves_a_pipeline_with_a_changed_unet(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, out, steps=2, train_mode="full", learning_rate=1e-4),
    )
    assert_finite_losses(out, 2)
    tuned = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.unet.parameters(), base.unet.parameters())]
    assert max(diffs) > 0
    assert np.abs(generate(tuned) - generate(base)).mean() > 1e-5


def test_v_prediction_bf16_run_logs_validation_images(tiny_sd_vpred, pickapic, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    # 16 px (8x8 latents): bf16 convolutions run 30x slower than fp32 on CPUs without bf16 instructions.
    launch(
        "train_inpo.py",
        *tiny_run_args(
            tiny_sd_vpred,
            pickapic,
            out,
            steps=2,
            latent_source="inversion",
            mixed_precision="bf16",
            resolution=16,
            run_validation=True,
            validation_steps=2,
            validation_prompts=["a red square", "a blue circle"],
        ),
    )
    assert_finite_losses(out, 2)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    images = {}
    for root, _, files in os.walk(os.path.join(out, "logs")):
        if any(name.startswith("events.out") for name in files):
            events = EventAccumulator(root, size_guidance={"images": 0})
            events.Reload()
            images.update({tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]})
    assert images == {"validation": [2], "final": [2]}  # one batch of the prompts' images per tag
    grid = Image.open(os.path.join(out, "validation_grid.png"))
    assert grid.size == (32, 16)  # two 16 px validation images side by side, from the saved LoRA
    assert "validation_grid.png" in open(os.path.join(out, "README.md")).read()


def test_resume_latest_matches_uninterrupted_run(tiny_sd, pickapic, uninterrupted, tmp_path):
    part = str(tmp_path / "part")
    common = {"checkpointing_steps": 2}
    # Stop after the checkpoint at step 2, then resume from it up to the uninterrupted run's 6 steps.
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, steps=2, **common))
    assert train_inpo.list_checkpoints(part) == ["checkpoint-2"]
    result = launch(
        "train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, steps=6, resume_from_checkpoint="latest", **common)
    )
    assert "Resuming from" in result.stdout + result.stderr
    assert train_inpo.list_checkpoints(part) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    resumed = load_file(os.path.join(part, "pytorch_lora_weights.safetensors"))
    straight = load_file(os.path.join(uninterrupted, "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5)
    # The resumed run logged steps 3 to 6 with the same losses as the uninterrupted one.
    part_losses, straight_losses = read_scalars(part, "loss"), read_scalars(uninterrupted, "loss")
    assert sorted(part_losses) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):
        assert part_losses[step] == pytest.approx(straight_losses[step], rel=1e-5)


def test_the_papers_inpo_and_diffusion_dpo_train_the_lora_through_the_same_script(tiny_sd, pickapic, tmp_path):
    for source in ("inversion", "forward"):
        out = str(tmp_path / source)
        launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, latent_source=source))
        assert_finite_losses(out, 2)
        weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
        assert any(v.abs().max() > 0 for k, v in weights.items() if "lora.up" in k)
        card = open(os.path.join(out, "README.md")).read()
        assert f"| latent source | {source}" in card
    assert "eta 0.1" in open(os.path.join(tmp_path, "inversion", "README.md")).read()
