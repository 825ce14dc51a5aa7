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
"""Tiny random-weight pipelines and Pick-a-Pic-layout datasets, built offline and saved the way real ones are.

Plain functions; conftest.py wraps them in pytest fixtures, benchmarks/cache_benchmark.py times training on them.
Both put the repository root on sys.path first (`benchmarks` is imported from there).

    build_tiny_sd        a StableDiffusionPipeline, 32 px images, 16x16 latents
    build_tiny_sdxl      a StableDiffusionXLPipeline (two text encoders, text_time conditioning), same sizes
    build_tiny_sd3       a StableDiffusion3Pipeline (two CLIP encoders and T5, an SD3 transformer, flow matching)
    build_tiny_pickapic  random colour-field pairs (the brighter one preferred) plus a tie, in Pick-a-Pic v2 layout
"""

import os

import numpy as np
import torch

from benchmarks.alignment_world import TINY_ALPHABET, write_tiny_clip_tokenizer
from benchmarks.pickapic_format import encode_png, write_pickapic_parquet


# 32 px images → 16x16 latents through the 2-level tiny VAE.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 16,
}

# The captions of build_tiny_pickapic's pairs, in order (row i has CAPTIONS[i % 6]).
CAPTIONS = ["a red square", "a blue circle", "a green cat", "a yellow dog", "a white house", "a black tree"]


def tiny_text_encoder(vocab_size, hidden_size, projection_dim=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_cls(config)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_scheduler(prediction_type):
    from diffusers import DDIMScheduler

    # The SD 1.5 schedule and conventions (scaled_linear betas, steps_offset=1, no clipping).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd(path, prediction_type="epsilon", seed=0):
    """Save a tiny StableDiffusionPipeline (32 px images, 16x16 latents) to `path`; return `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path, seed=0):
    """Save a tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning) to `path`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer_2 = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer_2"))
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=32, seed=seed)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), hidden_size=32, projection_dim=32, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # concatenated hidden states of both encoders
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + 6 time ids
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=tiny_scheduler("epsilon"),
    )
    pipe.save_pretrained(path)
    return path


def write_tiny_t5_tokenizer(path):
    """A T5 (unigram) tokenizer over single characters, saved to `path`."""
    from transformers import T5TokenizerFast

    pieces = list(TINY_ALPHABET) + ["▁" + c for c in TINY_ALPHABET]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(piece, -3.0) for piece in pieces]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_sd3(path, seed=0):
    """Save a tiny StableDiffusion3Pipeline (CLIP-L/G-like encoders, T5, SD3 transformer, shift-3 flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer_2 = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer_2"))
    tokenizer_3 = write_tiny_t5_tokenizer(os.path.join(path, "tokenizer_3"))
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=32, projection_dim=32, seed=seed)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), hidden_size=32, projection_dim=32, seed=seed + 1)
    torch.manual_seed(seed + 2)
    t5_config = T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    text_encoder_3 = T5EncoderModel(t5_config)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width; the two CLIP encoders' 32 + 32 are padded to it
        caption_projection_dim=16,
        pooled_projection_dim=64,  # both pooled projections
        pos_embed_max_size=16,
    )
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_pickapic(path, num_pairs=8, image_size=(40, 48), seed=0, split="train", extra_rows=()):
    """Write `<path>/<split>-00000-of-00001.parquet` in Pick-a-Pic v2 layout; the last row is always a tie.

    Images are random colour fields (brighter one preferred), `image_size` is (height, width) and deliberately
    not square so crops and resizes are exercised. `extra_rows` are appended as given (for bad-input tests).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        caption = CAPTIONS[i % len(CAPTIONS)]
        bright = rng.integers(128, 256, size=(*image_size, 3), dtype=np.uint8)
        dark = rng.integers(0, 128, size=(*image_size, 3), dtype=np.uint8)
        bright_first = bool(i % 2)
        rows.append(
            {
                "caption": caption,
                "jpg_0": encode_png(bright if bright_first else dark),
                "jpg_1": encode_png(dark if bright_first else bright),
                "label_0": 1.0 if bright_first else 0.0,
            }
        )
    tie = dict(rows[0], label_0=0.5)
    rows.append(tie)
    rows.extend(extra_rows)
    return write_pickapic_parquet(path, rows, split=split)
