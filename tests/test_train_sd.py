"""End-to-end runs of train_inpo.py on a tiny SD pipeline, through `accelerate launch`."""

import math
import os

import numpy as np
import pytest
import torch
from conftest import launch, read_scalars, tiny_run_args
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file


def generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=4, generator=generator, height=32, width=32, output_type="np").images


def assert_finite_losses(output_dir, steps):
    losses = read_scalars(output_dir, "loss")
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    accuracy = read_scalars(output_dir, "implicit_acc")
    assert all(0 <= v <= 1 for v in accuracy.values())
    return losses


def test_lora_run_writes_loadable_lora_that_changes_output(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=4))
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
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=3, use_8bit_adam=True,
                                           gradient_checkpointing=True, latent_source="forward"))  # fmt: skip
    assert_finite_losses(out, 3)
    weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    # Gaussian-initialised A and zero-initialised B: B is non-zero only if 8-bit AdamW updated it.
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)


def test_full_fine_tune_saves_a_pipeline_with_a_changed_unet(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, train_mode="full",
                                           inversion_model="reference", learning_rate=1e-4))  # fmt: skip
    assert_finite_losses(out, 2)
    tuned = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.unet.parameters(), base.unet.parameters())]
    assert max(diffs) > 0
    assert np.abs(generate(tuned) - generate(base)).mean() > 1e-5


def test_v_prediction_model_trains(tiny_sd_vpred, pickapic, tmp_path):
    out = str(tmp_path / "run")
    launch("train_inpo.py", *tiny_run_args(tiny_sd_vpred, pickapic, out, steps=2, inversion_endpoint="exact"))
    assert_finite_losses(out, 2)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_resume_latest_matches_uninterrupted_run(tiny_sd, pickapic, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = dict(steps=4, checkpointing_steps=2, inversion_eta=0.1)
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, full, **common))
    # Stop after the checkpoint at step 2, then resume from it.
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, **dict(common, steps=2)))
    assert sorted(os.listdir(part)).count("checkpoint-2") == 1
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, part, resume_from_checkpoint="latest", **common))
    assert "Resuming from" in result.stdout + result.stderr
    assert os.path.isdir(os.path.join(part, "checkpoint-4"))
    resumed = load_file(os.path.join(part, "pytorch_lora_weights.safetensors"))
    uninterrupted = load_file(os.path.join(full, "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-5)
    # The resumed run logged steps 3 and 4 with the same losses as the uninterrupted one.
    full_losses, part_losses = read_scalars(full, "loss"), read_scalars(part, "loss")
    assert part_losses[4] == pytest.approx(full_losses[4], rel=1e-5)
