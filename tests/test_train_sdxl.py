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
"""train_inpo_sdxl.py on a tiny SDXL pipeline (two text encoders, text_time conditioning)."""

import os
import types

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import train_inpo_sdxl
from conftest import launch, tiny_run_args


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red square", num_inference_steps=4, generator=generator, height=32, width=32, output_type="np"
    ).images


def test_sdxl_lora_run_loads_in_sdxl_pipeline_and_changes_output(tiny_sdxl, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = launch("train_inpo_sdxl.py", *tiny_run_args(tiny_sdxl, pickapic, out, steps=3, random_crop=True))
    assert "Steps: 100%" in result.stderr
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert "stable-diffusion-xl" in open(os.path.join(out, "README.md")).read()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - before).mean() > 1e-4


def test_time_ids_of_a_non_square_off_centre_crop():
    image = Image.fromarray(np.zeros((300, 200, 3), dtype=np.uint8))  # h=300, w=200
    _, original_size, crop = train_inpo_sdxl.resize_and_crop(image, 64, crop_fraction=(0.25, 0.5))
    # Resized to 64 wide, 96 high; a quarter of the 32 spare rows above the crop.
    assert original_size == (300, 200) and crop == (8, 0)
    time_ids = train_inpo_sdxl.sdxl_time_ids(torch.tensor([original_size]), torch.tensor([crop]), 64)
    assert time_ids.tolist() == [[300.0, 200.0, 8.0, 0.0, 64.0, 64.0]]


@pytest.mark.parametrize("fixed", [False, True])
def test_conditioning_shapes_and_time_ids(tiny_sdxl, fixed):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    frozen = {
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"),
    }
    args = types.SimpleNamespace(resolution=32, fixed_time_ids=fixed, proportion_empty_prompts=0.0)
    batch = {
        "captions": ["a cat", "a dog"],
        "original_sizes": torch.tensor([[40, 48], [50, 60], [40, 48], [70, 80]]),
        "crop_top_lefts": torch.tensor([[0, 4], [0, 7], [0, 4], [1, 2]]),
    }
    hidden, added = train_inpo_sdxl.encode_prompt(batch, frozen, args, torch.Generator())
    assert hidden.shape == (4, 16, 64)  # 2 pairs x 2 images, both encoders' 32-d states concatenated
    torch.testing.assert_close(hidden[:2], hidden[2:])  # a pair shares its caption
    assert added["text_embeds"].shape == (4, 32)
    expected = (
        [[32, 32, 0, 0, 32, 32]] * 4
        if fixed
        else [[40, 48, 0, 4, 32, 32], [50, 60, 0, 7, 32, 32], [40, 48, 0, 4, 32, 32], [70, 80, 1, 2, 32, 32]]
    )
    assert added["time_ids"].tolist() == expected


def test_sd_checkpoint_given_to_sdxl_script_fails_clearly(tiny_sd):
    # The check train_inpo_sdxl.py runs first, before the data or any weights (its launch is tested for the SD
    # script in test_data_and_inputs.py).
    with pytest.raises(ValueError, match="is not an SDXL checkpoint .* use train_inpo.py"):
        train_inpo_sdxl.check_model_family(tiny_sd, None, None, want_sdxl=train_inpo_sdxl.IS_SDXL)
