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
"""The paths a CUDA run in fp16 or bf16 takes, taken on the CPU: accelerate's GradScaler with an overflowing step,
autocast, LoRA alpha on load, the policy's dtype under DeepSpeed, SDXL's VAE at validation, memory at the final
validation. (The multi-process paths are in test_distributed.py.)"""

import gc
import os
import weakref

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import inpo_utils
import train_inpo
import train_inpo_sdxl
from conftest import launch, read_scalars, tiny_run_args


def test_fp16_overflow_is_skipped_by_the_scaler_and_the_run_finishes(
    tiny_sd, pickapic, tmp_path, simulated_fp16, overflow_at_backward
):
    out = str(tmp_path / "run")
    overflow_at_backward.add(2)  # the second optimizer step's gradient overflows
    # README's single-GPU flags: fp16, 8-bit AdamW, gradient checkpointing, validation images.
    readme_flags = {"use_8bit_adam": True, "gradient_checkpointing": True, "run_validation": True}
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=4, mixed_precision="fp16", **readme_flags))

    skipped, scale = read_scalars(out, "skipped_overflow_steps"), read_scalars(out, "loss_scale")
    assert sorted(skipped) == [1, 2, 3, 4]
    # The injected overflow was skipped, as were any the 2^16 initial scale caused by itself (here the first step's
    # gradients overflow in fp16 too: the routine case), and each skip halved the scale.
    assert skipped[2] == skipped[1] + 1 and skipped[4] < 4
    assert all(scale[step] == 2.0**16 / 2 ** skipped[step] for step in skipped)
    assert read_scalars(out, "skipped_nonfinite_steps")[4] == 0
    lora = load_file(os.path.join(out, train_inpo.LORA_WEIGHT_NAME))
    assert all(torch.isfinite(weight).all() for weight in lora.values())
    # The steps the scaler took moved the up projections off their zero initialisation.
    assert max(weight.abs().max() for name, weight in lora.items() if ".lora.up." in name) > 0
    assert os.path.isfile(os.path.join(out, "validation_grid.png"))  # validation under fp16 autocast


def test_a_scaler_that_keeps_skipping_stops_the_run():
    accelerator = type("FakeAccelerator", (), {"scaler": None})()
    train_inpo.check_overflow_steps(train_inpo.MAX_CONSECUTIVE_OVERFLOW_STEPS - 1, 40, accelerator)
    with pytest.raises(FloatingPointError, match="skipped the last 30 optimizer steps.*bf16"):
        train_inpo.check_overflow_steps(train_inpo.MAX_CONSECUTIVE_OVERFLOW_STEPS, 40, accelerator)


def test_nonfinite_loss_without_a_scaler_still_stops(tiny_sd, pickapic, tmp_path, monkeypatch):
    original = inpo_utils.inpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(inpo_utils, "inpo_loss", nan_loss)
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, str(tmp_path / "run"), steps=2), check=False)
    assert result.returncode != 0
    assert "Non-finite loss or gradient at optimizer step 1" in result.stderr


def test_bf16_autocast_run_trains(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    flags = {"use_8bit_adam": True, "gradient_checkpointing": True}
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, mixed_precision="bf16", **flags))
    losses = read_scalars(out, "loss")
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    lora = load_file(os.path.join(out, train_inpo.LORA_WEIGHT_NAME))
    assert all(weight.dtype == torch.float32 and torch.isfinite(weight).all() for weight in lora.values())


@pytest.fixture
def prepared_models(monkeypatch):
    """Every model `accelerator.prepare` returns, in order."""
    models, original_prepare = [], Accelerator.prepare

    def prepare(self, *args, **kwargs):
        prepared = original_prepare(self, *args, **kwargs)
        models.extend(
            obj for obj in (prepared if isinstance(prepared, tuple) else (prepared,)) if hasattr(obj, "peft_config")
        )
        return prepared

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    return models


def unet_inputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    hidden = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([100, 700]), hidden


def test_lora_alpha_other_than_rank_loads_at_the_trained_strength(tiny_sd, pickapic, tmp_path, prepared_models):
    out = str(tmp_path / "run")
    flags = tiny_run_args(tiny_sd, pickapic, out, steps=3, rank=4, lora_alpha=16, learning_rate=5e-3)
    launch("train_inpo.py", *flags, "--output_kohya_format")
    (trained,) = prepared_models
    inputs = unet_inputs(trained)
    with torch.no_grad():
        trained_output = trained(*inputs).sample
        for weight_name in (train_inpo.LORA_WEIGHT_NAME, train_inpo.KOHYA_LORA_WEIGHT_NAME):
            pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
            base_output = pipeline.unet(*inputs).sample
            pipeline.load_lora_weights(out, weight_name=weight_name)
            loaded_output = pipeline.unet(*inputs).sample
            lora_effect = (trained_output - base_output).abs().max()
            assert lora_effect > 1e-3, weight_name
            assert (loaded_output - trained_output).abs().max() < 1e-3 * lora_effect, weight_name


def test_policy_inputs_take_the_policys_dtype_as_under_deepspeed_bf16(tiny_sd):
    """DeepSpeed casts the module to bf16 and runs no autocast: fp32 latents would not reach its bf16 weights."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").to(torch.bfloat16)
    latents, timesteps, hidden = unet_inputs(unet)
    reference_errors = torch.zeros(2)
    with pytest.raises(RuntimeError, match="dtype"):
        unet(latents, timesteps, hidden)
    loss, metrics = inpo_utils.score_pairs(
        unet, latents, latents, timesteps, hidden, reference_errors, 100.0, policy_dtype=torch.bfloat16
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Outside DeepSpeed the trainable weights are fp32 (LoRA beside half-precision base weights), so are the inputs.
    accelerator = Accelerator(cpu=True)
    assert train_inpo.policy_input_dtype(accelerator) == torch.float32


class AutocastingAccelerator:
    """What log_validation_images uses of an Accelerator, with the half-precision autocast of a mixed-precision run
    (bf16: the CPU's half precision here; on a GPU, fp16)."""

    device = torch.device("cpu")
    trackers = []

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def test_sdxl_validation_decodes_with_the_vae_in_its_own_fp32(tiny_sdxl):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    decoded_dtypes = []
    pipeline.vae.decoder.conv_out.register_forward_hook(lambda module, i, output: decoded_dtypes.append(output.dtype))
    unet_dtypes = []
    pipeline.unet.conv_out.register_forward_hook(lambda module, i, output: unet_dtypes.append(output.dtype))
    images = train_inpo_sdxl.log_validation_images(AutocastingAccelerator(), pipeline, ["a red square"], 0, 32, 0)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert set(unet_dtypes) == {torch.bfloat16}  # the denoising ran under autocast
    assert decoded_dtypes == [torch.float32]  # the VAE did not


def test_sdxl_pipeline_from_the_cache_loads_the_runs_fixed_vae(tiny_sdxl, pickapic, tmp_path):
    fixed_vae_path = str(tmp_path / "fixed-vae")
    fixed = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        fixed.decoder.conv_out.bias.add_(0.5)
    fixed.save_pretrained(fixed_vae_path)
    args = train_inpo_sdxl.parse_args(
        tiny_run_args(tiny_sdxl, pickapic, str(tmp_path / "out"), pretrained_vae_model_name_or_path=fixed_vae_path)
    )
    pipeline = train_inpo_sdxl.make_pipeline(args, Accelerator(cpu=True))  # no frozen models: training from a cache
    torch.testing.assert_close(pipeline.vae.decoder.conv_out.bias, fixed.decoder.conv_out.bias)


def test_final_validation_runs_after_the_training_state_is_freed(
    tiny_sd, pickapic, tmp_path, monkeypatch, prepared_models
):
    trained = []
    original_save = StableDiffusionPipeline.save_lora_weights.__func__
    alive_at_final_validation = []

    def save_lora_weights(cls, *args, **kwargs):
        if prepared_models and not trained:
            trained.append(weakref.ref(prepared_models.pop()))  # only a weak reference from here on
        return original_save(cls, *args, **kwargs)

    def load_lora_weights(self, *args, **kwargs):
        gc.collect()
        alive_at_final_validation.append(trained[0]() is not None)
        return original_load(self, *args, **kwargs)

    original_load = StableDiffusionPipeline.load_lora_weights
    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", classmethod(save_lora_weights))
    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", load_lora_weights)
    out = str(tmp_path / "run")
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=1), "--run_validation")
    assert alive_at_final_validation == [False]
    assert os.path.isfile(os.path.join(out, "validation_grid.png"))


def test_drop_captions_draws_the_same_numbers_whatever_the_proportion():
    for proportion, expected in ((0.0, ["a", "b", "c"]), (1.0, ["", "", ""])):
        generator = torch.Generator().manual_seed(0)
        assert train_inpo.drop_captions(["a", "b", "c"], proportion, generator) == expected
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state()) is False
        after = torch.rand(1, generator=generator)
        reference = torch.Generator().manual_seed(0)
        torch.rand(3, generator=reference)
        assert torch.equal(after, torch.rand(1, generator=reference))
