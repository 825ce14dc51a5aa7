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
"""A trained LoRA is a plain diffusers LoRA: it loads into pipelines other than the one it was trained with."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch, tiny_run_args


PROMPT = "a red square"


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, pickapic, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sdxl-lora"))
    launch("train_inpo_sdxl.py", *tiny_run_args(tiny_sdxl, pickapic, out, steps=3))
    return out


def init_image():
    gradient = np.linspace(0, 255, 32, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(gradient, (32, 1))] * 3, axis=-1))


def mask_image():
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return Image.fromarray(mask)


def changes_with_lora(pipe, lora_dir, **call):
    """Mean absolute pixel change of the same call (same seed) once the LoRA is loaded."""

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPT, num_inference_steps=4, generator=generator, output_type="np", **call).images

    before = generate()
    pipe.load_lora_weights(lora_dir)
    assert pipe.get_active_adapters(), "the LoRA did not attach to the pipeline"
    return float(np.abs(generate() - before).mean())


@pytest.mark.parametrize(
    "pipeline_name, call",
    [
        ("AutoPipelineForText2Image", {"height": 32, "width": 32}),
        ("StableDiffusionImg2ImgPipeline", {"image": init_image(), "strength": 0.75}),
        ("AutoPipelineForInpainting", {"image": init_image(), "mask_image": mask_image(), "height": 32, "width": 32}),
    ],
)
def test_sd_lora_changes_other_pipelines(tiny_sd, uninterrupted, pipeline_name, call):
    import diffusers

    pipe = getattr(diffusers, pipeline_name).from_pretrained(tiny_sd, safety_checker=None)
    assert type(pipe).__name__.startswith("StableDiffusion") and "XL" not in type(pipe).__name__
    if pipeline_name == "AutoPipelineForInpainting":
        assert isinstance(pipe, diffusers.StableDiffusionInpaintPipeline)
    assert changes_with_lora(pipe, uninterrupted, **call) > 1e-4


@pytest.mark.parametrize(
    "pipeline_name, call",
    [
        ("AutoPipelineForText2Image", {"height": 32, "width": 32}),
        ("AutoPipelineForImage2Image", {"image": init_image(), "strength": 0.75}),
    ],
)
def test_sdxl_lora_changes_other_pipelines(tiny_sdxl, sdxl_lora, pipeline_name, call):
    import diffusers

    pipe = getattr(diffusers, pipeline_name).from_pretrained(tiny_sdxl)
    assert type(pipe).__name__.startswith("StableDiffusionXL")
    assert changes_with_lora(pipe, sdxl_lora, **call) > 1e-4
