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
"""train_inpo_sd3.py on a tiny SD3 pipeline (two CLIP encoders and T5, an SD3 transformer, flow matching)."""

import os
import shutil
import types

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from safetensors.torch import load_file

import inpo_utils
import train_inpo_sd3
from conftest import launch, read_scalars, tiny_run_args


def sd3_run_args(model, data, output_dir, steps=3, **overrides):
    return tiny_run_args(model, data, output_dir, steps=steps, max_sequence_length=8, **overrides)


def generate(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt="a red square",
        num_inference_steps=3,
        generator=generator,
        height=32,
        width=32,
        max_sequence_length=8,
        output_type="np",
        **kwargs,
    ).images


def test_lora_run_loads_into_sd3_text_and_image_pipelines_and_changes_their_output(tiny_sd3, pickapic, tmp_path):
    out = str(tmp_path / "run")
    # bf16: the frozen encoders (T5 included) load in bf16 and the policy's forward runs under autocast.
    launch("train_inpo_sd3.py", *sd3_run_args(tiny_sd3, pickapic, out, mixed_precision="bf16"))
    card = open(os.path.join(out, "README.md")).read()
    assert "stable-diffusion-3" in card and "Stable Diffusion 3" in card
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert lora and all(key.startswith("transformer.") for key in lora)
    assert any(".lora_B." in key and weight.abs().max() > 0 for key, weight in lora.items())

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - before).mean() > 1e-4

    img2img = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_sd3)
    image = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    before = generate(img2img, image=image, strength=0.8)
    img2img.load_lora_weights(out)
    assert np.abs(generate(img2img, image=image, strength=0.8) - before).mean() > 1e-4


def test_resume_latest_matches_uninterrupted_run(tiny_sd3, pickapic, tmp_path):
    straight, part = str(tmp_path / "straight"), str(tmp_path / "part")
    launch("train_inpo_sd3.py", *sd3_run_args(tiny_sd3, pickapic, straight, steps=4, checkpointing_steps=2))
    launch("train_inpo_sd3.py", *sd3_run_args(tiny_sd3, pickapic, part, steps=2, checkpointing_steps=2))
    result = launch(
        "train_inpo_sd3.py",
        *sd3_run_args(tiny_sd3, pickapic, part, steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"),
    )
    assert "Resuming from" in result.stdout + result.stderr
    assert train_inpo_sd3.list_checkpoints(part) == ["checkpoint-2", "checkpoint-4"]
    resumed = load_file(os.path.join(part, "pytorch_lora_weights.safetensors"))
    expected = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5)
    part_losses, straight_losses = read_scalars(part, "loss"), read_scalars(straight, "loss")
    for step in (3, 4):
        assert part_losses[step] == pytest.approx(straight_losses[step], rel=1e-5)


def test_cache_then_training_from_it_needs_only_the_transformer(tiny_sd3, pickapic, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_sd3, model)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "cached")
    flags = {"inversion_cache_dir": cache, "cache_shard_size": 3}
    launch("train_inpo_sd3.py", *sd3_run_args(model, pickapic, out, precompute_inversion_cache=True, **flags))
    assert os.path.isfile(os.path.join(cache, "manifest.json"))
    for name in train_inpo_sd3.frozen_model_subfolders(types.SimpleNamespace(without_t5=False)):
        shutil.rmtree(os.path.join(model, name))
    result = launch("train_inpo_sd3.py", *sd3_run_args(model, pickapic, out, **flags))
    assert "Training from the inversion cache" in result.stderr
    assert sorted(read_scalars(out, "loss")) == [1, 2, 3]
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(".lora_B." in key and weight.abs().max() > 0 for key, weight in lora.items())


def test_fp16_overflow_is_skipped_and_diffusion_dpo_trains_without_t5(
    tiny_sd3, pickapic, tmp_path, simulated_fp16, overflow_at_backward
):
    out = str(tmp_path / "dpo")
    overflow_at_backward.add(2)
    flags = {"latent_source": "forward", "without_t5": True, "mixed_precision": "fp16", "use_8bit_adam": True}
    launch("train_inpo_sd3.py", *sd3_run_args(tiny_sd3, pickapic, out, steps=4, gradient_checkpointing=True, **flags))
    skipped = read_scalars(out, "skipped_overflow_steps")
    assert skipped[2] == skipped[1] + 1 and skipped[4] < 4 and read_scalars(out, "skipped_nonfinite_steps")[4] == 0
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(weight).all() for weight in lora.values())
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - before).mean() > 1e-4


def frozen_models(model, without_t5):
    args = types.SimpleNamespace(
        pretrained_model_name_or_path=model,
        revision=None,
        variant=None,
        cache_dir=None,
        allow_unsafe_pickle_weights=False,
        without_t5=without_t5,
    )
    return train_inpo_sd3.load_frozen_models(args, Accelerator(cpu=True))


@pytest.mark.parametrize("without_t5", [False, True])
def test_conditioning_is_the_pipelines_own(tiny_sd3, without_t5):
    frozen = frozen_models(tiny_sd3, without_t5)
    args = types.SimpleNamespace(proportion_empty_prompts=0.0, max_sequence_length=8, joint_attention_dim=64)
    captions = ["a red square", "a blue circle"]
    hidden, added = train_inpo_sd3.encode_prompt({"captions": captions}, frozen, args, torch.Generator())
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3, **({"text_encoder_3": None, "tokenizer_3": None} if without_t5 else {})
    )
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    assert hidden.shape == (4, 16 + 8, 64)  # CLIP's 16 tokens, then T5's 8, at T5's width
    torch.testing.assert_close(hidden, expected.repeat(2, 1, 1))
    torch.testing.assert_close(added["pooled_projections"], expected_pooled.repeat(2, 1))


def test_cached_loss_equals_online_loss_on_the_same_draws(tiny_sd3, pickapic, tmp_path):
    args = train_inpo_sd3.parse_args(
        sd3_run_args(
            tiny_sd3, pickapic, str(tmp_path / "out"), inversion_cache_dir=str(tmp_path / "c"), cache_dtype="fp32"
        )
    )
    accelerator = Accelerator(cpu=True)
    scheduler_config, transformer_config = train_inpo_sd3.check_model_family(tiny_sd3, None, None)
    args.joint_attention_dim = transformer_config["joint_attention_dim"]
    frozen = frozen_models(tiny_sd3, False)
    transformer = train_inpo_sd3.load_transformer(args).requires_grad_(False)
    schedule = train_inpo_sd3.make_inverse_scheduler(scheduler_config, args, "cpu")
    pairs = train_inpo_sd3.PreferencePairs(
        train_inpo_sd3.load_preference_dataset(pickapic, "train", log=lambda _: None), 32, False, True, 0
    )
    batch = train_inpo_sd3.collate_pairs([pairs[i] for i in range(3)])
    generator = torch.Generator().manual_seed(0)
    rows = train_inpo_sd3.compute_cache_rows(batch, frozen, transformer, schedule, args, accelerator, generator)
    assert rows["timesteps"].dtype == torch.float32 and 0 < rows["timesteps"].min() <= rows["timesteps"].max() <= 1

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, parameter in transformer.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    cached = {name[len("added_cond.") :]: value for name, value in rows.items() if name.startswith("added_cond.")}
    cached_batch = {
        "x0": torch.cat([rows["x0"][:, 0], rows["x0"][:, 1]]),
        "noise": torch.cat([rows["noise"][:, 0], rows["noise"][:, 1]]),
        "timesteps": rows["timesteps"][:, 0],
        "reference_errors": torch.cat([rows["reference_errors"][:, 0, 0], rows["reference_errors"][:, 1, 0]]),
        "encoder_hidden_states": rows["encoder_hidden_states"].repeat(2, 1, 1),
        "added_cond_kwargs": {k: torch.cat([v[:, 0], v[:, 1]]) for k, v in cached.items()},
        "fresh_noise": inpo_utils.seeded_noise(rows["noise_seeds"][:, 0].tolist(), rows["x0"].shape[2:]).repeat(
            2, 1, 1, 1
        ),
    }
    cached_loss, cached_metrics = train_inpo_sd3.compute_cached_loss(
        cached_batch, transformer, schedule, args, accelerator
    )
    reference = train_inpo_sd3.FlowMatchingModel(inpo_utils.AdaptersDisabled(transformer), 1000)
    online_loss, online_metrics = inpo_utils.inpo_step_loss(
        train_inpo_sd3.FlowMatchingModel(transformer, 1000),
        reference,
        reference,
        cached_batch["x0"],
        cached_batch["encoder_hidden_states"],
        schedule,
        args.beta_dpo,
        added_cond_kwargs=cached_batch["added_cond_kwargs"],
        timesteps=cached_batch["timesteps"],
        fresh_noise_mix=args.fresh_noise_mix,
        fresh_noise=cached_batch["fresh_noise"],
    )
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=1e-4, abs=1e-6)
    for name in ("reference_mse", "policy_mse", "reward_margin", "timestep"):
        assert cached_metrics[name].item() == pytest.approx(online_metrics[name].item(), rel=1e-3, abs=1e-7)
    assert abs(cached_metrics["reward_margin"].item()) > 1e-5


def test_other_families_and_the_papers_inversion_are_refused(tiny_sd, tiny_sd3, pickapic, tmp_path):
    with pytest.raises(ValueError, match="not a diffusers SD3 pipeline .* train_inpo.py"):
        train_inpo_sd3.check_model_family(tiny_sd, None, None)
    with pytest.raises(ValueError, match="--latent_source inversion .* for SD3 use inverted_noise"):
        train_inpo_sd3.parse_args(sd3_run_args(tiny_sd3, pickapic, str(tmp_path), latent_source="inversion"))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        train_inpo_sd3.parse_args(sd3_run_args(tiny_sd3, pickapic, str(tmp_path), resolution=40))
