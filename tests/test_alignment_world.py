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
"""Tests of the synthetic alignment world (benchmarks/alignment_world.py): renderer, reward, fidelity, pairs."""

import numpy as np
import pytest

from benchmarks import alignment_world as world


def _flat(grey, colour=None, size=world.IMAGE_SIZE):
    """A hand-made float image (32, 32, 3): uniform grey, with a 10x10 `colour` square in the middle if given."""
    image = np.full((size, size, 3), grey, dtype=np.float64)
    if colour is not None:
        image[11:21, 11:21] = colour
    return image


def test_render_is_deterministic_and_draws_the_caption_colour():
    for caption in world.ALL_CAPTIONS:
        parts = world.parse_caption(caption)
        first = world.render(parts, np.random.default_rng(7))
        again = world.render(parts, np.random.default_rng(7))
        other = world.render(parts, np.random.default_rng(8))
        assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)
        assert world.predict_colour(first[None] / 255.0) == [parts[0]]


def test_render_dataset_covers_every_caption():
    images, captions = world.render_dataset(24, seed=0)
    assert images.shape == (24, 32, 32, 3)
    assert sorted(set(captions)) == sorted(world.ALL_CAPTIONS)


def test_background_brightness_ranks_hand_made_images():
    images = np.stack([_flat(0.2, (0.9, 0.1, 0.1)), _flat(0.8, (0.9, 0.1, 0.1)), _flat(0.5, (0.1, 0.2, 0.9))])
    rewards = world.reward_of("background_brightness", images, ["a red square", "a red square", "a blue square"])
    np.testing.assert_allclose(rewards, [0.2, 0.8, 0.5], atol=1e-9)  # the shape itself does not count
    assert world.reward_of("background_brightness", _flat(0.5, (0.9, 0.1, 0.1))[None], ["a red square"])[
        0
    ] == pytest.approx(0.5)


def test_centredness_ranks_hand_made_images():
    centred = _flat(0.5, (0.9, 0.1, 0.1))
    off_centre = _flat(0.5)
    off_centre[0:10, 0:10] = (0.9, 0.1, 0.1)
    empty = _flat(0.5)
    rewards = world.reward_of("centredness", np.stack([centred, off_centre, empty]), ["a red square"] * 3)
    assert rewards[0] == pytest.approx(1.0)
    assert rewards[0] > rewards[1] > rewards[2] == 0.0


def test_edge_sharpness_is_one_for_a_hard_edge_and_a_half_for_a_one_pixel_blur():
    hard = _flat(0.5, (0.9, 0.1, 0.1))
    blurred = hard.copy()
    ring = np.zeros((32, 32), dtype=bool)
    ring[10:22, 10:22] = True
    ring[11:21, 11:21] = False
    # A 1-pixel ring halfway between background and shape: 44 transition pixels along a 44-pixel outline (the ring
    # itself is saturated enough to count as shape), so the edge is 1 pixel wide.
    blurred[ring] = 0.5 * np.array([0.5, 0.5, 0.5]) + 0.5 * np.array([0.9, 0.1, 0.1])
    rewards = world.reward_of("edge_sharpness", np.stack([hard, blurred, _flat(0.5)]), ["a red square"] * 3)
    np.testing.assert_allclose(rewards, [1.0, 0.5, 0.0], atol=1e-12)


def test_renders_have_anti_aliased_edges_and_clean_backgrounds():
    images, captions = world.render_dataset(48, seed=0)
    sharpness = world.reward_of("edge_sharpness", images / 255.0, captions)
    assert 0.4 < sharpness.min() and sharpness.max() < 1.0  # anti-aliasing: some transition, under 2 px wide
    assert world.quality(images / 255.0) < 1e-3  # only uint8 rounding of the flat grey


def test_background_roughness_is_the_mean_absolute_deviation_from_the_3x3_mean():
    clean = _flat(0.5, (0.9, 0.1, 0.1))
    checker = clean.copy()
    yy, xx = np.mgrid[:32, :32]
    sign = np.where((yy + xx) % 2 == 0, 1.0, -1.0)
    checker[:5] += 0.1 * sign[:5, :, None]  # a ±0.1 checkerboard on the top rows (all background)
    roughness = world.background_roughness(np.stack([clean, checker]))
    assert roughness[0] == pytest.approx(0.0, abs=1e-12)
    # Counted pixels: off the border, with no shape pixel (the square at 11..20) in their 3x3 window.
    luminance = checker @ np.array([0.299, 0.587, 0.114])
    clear = np.zeros((32, 32), dtype=bool)
    clear[1:31, 1:31] = True
    clear[10:22, 10:22] = False
    local = np.zeros((32, 32))
    for y, x in zip(*np.nonzero(clear)):
        local[y, x] = abs(luminance[y, x] - luminance[y - 1 : y + 2, x - 1 : x + 2].mean())
    assert roughness[1] == pytest.approx(local[clear].mean(), rel=1e-12)
    assert world.quality(np.stack([clean, checker])) == pytest.approx(roughness.mean())


def test_unknown_reward_is_rejected():
    with pytest.raises(ValueError, match="registered"):
        world.reward_of("sharpness", _flat(0.5)[None], ["a red square"])


def test_fidelity_is_right_on_renders_and_wrong_on_mismatches():
    images, captions = world.render_dataset(96, seed=3)
    assert world.fidelity(images / 255.0, captions) == 1.0
    swapped = [world.caption_of("blue" if world.parse_caption(c)[0] != "blue" else "red", "circle") for c in captions]
    assert world.fidelity(images / 255.0, swapped) == 0.0
    assert world.predict_colour(_flat(0.9)[None]) == [None]  # no shape: never counts as correct


def test_win_rate_counts_ties_as_half():
    assert world.win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An almost untrained base model: enough to check the pipeline layout, caching and the pair path."""
    path = str(tmp_path_factory.mktemp("world") / "base")
    config = world.BaseModelConfig(num_train_images=24, vae_steps=1, unet_steps=1, batch_size=4)
    meta = world.build_base_model(path, config, num_check_seeds=1, num_inference_steps=2, log=lambda *_: None)
    return path, config, meta


def test_base_model_is_an_sd_pipeline_and_is_cached(tiny_base):
    path, config, meta = tiny_base
    pipe = world.load_pipeline(path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    assert world.family_of(path) == "sd" and world.max_sequence_length_of(path) is None
    messages = []
    assert world.build_base_model(path, config, log=messages.append) == meta
    assert "up to date" in messages[0]


def test_preference_pairs_load_with_datasets_and_have_valid_labels(tiny_base, tmp_path):
    from datasets import load_dataset

    path, config, meta = tiny_base
    pipe = world.load_pipeline(path)
    folder = str(tmp_path / "pairs")
    pairs_meta = world.make_preference_pairs(
        pipe, folder, num_pairs=6, num_inference_steps=2, fingerprint=meta["fingerprint"], log=lambda *_: None
    )
    dataset = load_dataset(folder, split="train")
    assert dataset.num_rows == 6
    assert dataset.features["caption"].dtype == "string" and dataset.features["label_0"].dtype == "float64"
    assert set(dataset["label_0"]) <= {0.0, 0.5, 1.0}
    assert sum(pairs_meta["label_counts"].values()) == 6
    row = dataset[0]
    images = np.stack([np.asarray(_decode_png(row[k])) / 255.0 for k in ("jpg_0", "jpg_1")])
    assert images.shape == (2, 32, 32, 3)
    rewards = world.reward_of(world.DEFAULT_REWARD, images, [row["caption"]] * 2)
    assert row["label_0"] == (1.0 if rewards[0] > rewards[1] else 0.0 if rewards[0] < rewards[1] else 0.5)


def _decode_png(value):
    """A `datasets` binary cell (bytes) as a PIL image."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(value)).convert("RGB")


def test_object_size_and_horizontal_position_of_hand_made_images():
    small, large = _flat(0.5), _flat(0.5)
    small[0:4, 0:4] = (0.9, 0.1, 0.1)  # 16 pixels, centroid x = 2
    large[0:8, 24:32] = (0.9, 0.1, 0.1)  # 64 pixels, centroid x = 28
    images = np.stack([small, large, _flat(0.5)])
    np.testing.assert_allclose(world.reward_of("object_size", images, ["a red square"] * 3), [16 / 1024, 64 / 1024, 0])
    np.testing.assert_allclose(
        world.reward_of("horizontal_position", images, ["a red square"] * 3), [2 / 32, 28 / 32, 0.5]
    )


def test_the_default_world_renders_as_before_and_the_shipped_model_matches_its_fingerprint():
    import hashlib
    import json
    import os

    images, _ = world.render_dataset(64, seed=0)
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == "43d3d4d6726c158a"
    asset = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "assets", "world_base_model")
    with open(os.path.join(asset, world.META_FILE)) as f:
        assert json.load(f)["fingerprint"] == world.WORLDS[world.DEFAULT_WORLD].config.fingerprint()


def test_suite_worlds_render_their_structure():
    striped = world.WORLDS["striped_size"].config.world()
    two_64 = world.WORLDS["two_shapes_64_sharpness"].config.world()
    rng = np.random.default_rng(0)
    flat = world.render(("red", "circle"), np.random.default_rng(0)) / 255.0
    image = world.render(("red", "circle"), rng, **striped) / 255.0
    background = ~world.foreground_mask(image[None])[0]
    # Stripes are grey (no chroma: the shape is still found) with a texture a flat render does not have.
    assert world.predict_colour(image[None]) == ["red"]
    assert image[background].std() > 0.02 > flat[~world.foreground_mask(flat[None])[0]].std()
    image = world.render(("blue", "square"), np.random.default_rng(1), **two_64) / 255.0
    assert image.shape == (64, 64, 3) and world.predict_colour(image[None]) == ["blue"]
    # Two squares: more shape pixels than one square of the largest radius can cover in some renders.
    sizes = [
        world.object_size(world.render(("blue", "square"), np.random.default_rng(s), **two_64)[None] / 255.0, None)
        for s in range(20)
    ]
    one_square_max = (2 * 6.0 * 2) ** 2 / 64**2
    assert max(sizes) > one_square_max


@pytest.mark.parametrize("name", sorted(world.WORLDS))
def test_suite_world_models_have_the_world_size_and_16px_latents(name):
    import torch

    config = world.WORLDS[name].config
    vae = world._vae(config.image_size)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, config.image_size, config.image_size)).latent_dist.mean
    assert latents.shape == (1, 4, world.LATENT_SIZE, world.LATENT_SIZE)
    if config.family == "sd3":
        transformer = world._transformer(config)
        tokens = world.TOKENIZER_MAX_LENGTH + world.SD3_MAX_SEQUENCE_LENGTH
        with torch.no_grad():
            velocity = transformer(
                hidden_states=latents,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.zeros(1, tokens, transformer.config.joint_attention_dim),
                pooled_projections=torch.zeros(1, transformer.config.pooled_projection_dim),
            ).sample
        assert velocity.shape == latents.shape
    else:
        unet = world._unet(config.unet_channels)
        assert unet.config.block_out_channels == tuple(config.unet_channels)
    assert config.fingerprint() != world.BaseModelConfig().fingerprint() or name == world.DEFAULT_WORLD


def test_sd_fingerprints_leave_the_sd3_fields_out():
    # The shipped SD base model (benchmarks/assets/world_base_model) is cached under this fingerprint.
    assert world.BaseModelConfig().fingerprint() == "e610f91ec4889016"
    assert world.BaseModelConfig(transformer_layers=2).fingerprint() == "e610f91ec4889016"
    sd3 = world.BaseModelConfig(family="sd3")
    assert sd3.fingerprint() != world.BaseModelConfig().fingerprint()
    assert world.BaseModelConfig(family="sd3", transformer_layers=2).fingerprint() != sd3.fingerprint()
    assert world.WORLDS["shapes_brightness_flow"].config == sd3
    with pytest.raises(ValueError, match="family"):
        world.BaseModelConfig(family="sdxl")


@pytest.fixture(scope="module")
def tiny_sd3_base(tmp_path_factory):
    """An almost untrained SD3-layout base model: enough to check the pipeline layout, sampling and LoRA paths."""
    path = str(tmp_path_factory.mktemp("world") / "base_sd3")
    config = world.BaseModelConfig(
        family="sd3", num_train_images=24, vae_steps=1, unet_steps=1, batch_size=4, transformer_layers=2
    )
    meta = world.build_base_model(path, config, num_check_seeds=1, num_inference_steps=2, log=lambda *_: None)
    return path, config, meta


def test_sd3_base_model_is_an_sd3_pipeline_that_samples_the_world_size(tiny_sd3_base):
    path, config, meta = tiny_sd3_base
    pipe = world.load_pipeline(path)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    assert pipe.vae.config.shift_factor == pytest.approx(meta["shift_factor"])
    assert world.family_of(path) == "sd3" and meta["family"] == "sd3"
    assert world.max_sequence_length_of(path) == world.SD3_MAX_SEQUENCE_LENGTH == meta["max_sequence_length"]
    assert meta["fingerprint"] == config.fingerprint() != world.BaseModelConfig().fingerprint()
    captions, seeds = world.ALL_CAPTIONS[:3], [0, 1, 0]
    images = world.sample_images(pipe, captions, seeds, num_inference_steps=2, guidance_scale=world.GUIDANCE_SCALE)
    assert images.shape == (3, 32, 32, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    # One generator per image: an image does not depend on the batch it was drawn in (up to a uint8 level, from
    # float rounding that differs with the batch size).
    alone = world.sample_images(pipe, captions[2:], seeds[2:], num_inference_steps=2, guidance_scale=5.0)
    np.testing.assert_allclose(alone[0], images[2], atol=1.01 / 255)
    messages = []
    assert world.build_base_model(path, config, log=messages.append) == meta
    assert "up to date" in messages[0]


def _save_random_sd3_lora(model_dir, folder):
    """A LoRA on the transformer with random (non-zero) up-projections, so it visibly changes the images."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # zero-initialised by peft, which would make the LoRA a no-op
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer))
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=lora_layers)
    return folder


def test_sd3_lora_changes_evaluate_lora_images_and_is_unloaded(tiny_sd3_base, tmp_path):
    path, _, _ = tiny_sd3_base
    pipe = world.load_pipeline(path)
    lora_dir = _save_random_sd3_lora(path, str(tmp_path / "lora"))
    captions, seeds = world.eval_prompts(1)
    sampling = {"num_inference_steps": 2}
    before = world.evaluate(pipe, captions, seeds, **sampling)
    tuned = world.evaluate_lora(pipe, lora_dir, captions, seeds, **sampling)
    after = world.evaluate(pipe, captions, seeds, **sampling)
    assert np.abs(tuned["images"] - before["images"]).max() > 0.05
    np.testing.assert_array_equal(after["images"], before["images"])
    assert not pipe.get_list_adapters()
