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
"""Flags shared with diffusers' Diffusion-DPO scripts and the authors' script: loss types, lr schedule shape,
Adafactor, and a kohya/webui copy of the LoRA."""

import math
import os

import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import train_inpo
from conftest import launch, read_scalars, tiny_run_args


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red square", num_inference_steps=4, generator=generator, height=32, width=32, output_type="np"
    ).images


@pytest.fixture(scope="module")
def parity_run(tiny_sd, pickapic, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    launch(
        "train_inpo.py",
        *tiny_run_args(
            tiny_sd,
            pickapic,
            out,
            steps=4,
            use_adafactor=True,
            output_kohya_format=True,
            loss_type="hinge",
            lr_scheduler="cosine_with_restarts",
            lr_num_cycles=2,
        ),
    )
    return out


def test_adafactor_is_transformers_adafactor_at_the_given_lr(tiny_sd, tmp_path):
    args = train_inpo.parse_args(tiny_run_args(tiny_sd, "data", str(tmp_path), use_adafactor=True))
    optimizer = train_inpo.make_optimizer([torch.nn.Parameter(torch.zeros(2))], args)
    assert isinstance(optimizer, transformers.Adafactor)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and not group["relative_step"] and not group["scale_parameter"]


def test_adafactor_run_updates_the_lora(parity_run):
    weights = load_file(os.path.join(parity_run, "pytorch_lora_weights.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # zero-initialised, so Adafactor moved it
    assert "| loss | hinge |" in open(os.path.join(parity_run, "README.md")).read()


def test_cosine_with_restarts_follows_lr_num_cycles(parity_run):
    lr = read_scalars(parity_run, "lr")
    # 4 steps, 2 cycles: the lr after step k is 1e-3 · ½(1 + cos(π · ((2k/4) mod 1))).
    expected = {k: 1e-3 * 0.5 * (1 + math.cos(math.pi * ((2 * k / 4) % 1.0))) for k in (1, 2, 3)}
    for step, value in expected.items():
        assert lr[step] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, lr)


def test_polynomial_lr_power_is_passed_to_the_scheduler(tmp_path):
    args = train_inpo.parse_args(
        tiny_run_args("model", "data", str(tmp_path), lr_scheduler="polynomial", lr_power=2.0, steps=10)
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train_inpo.make_lr_scheduler(optimizer, args, num_processes=1)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    # polynomial decay to lr_end 1e-7: (1 − 5/10)² of the way from 1.
    assert scheduler.get_last_lr()[0] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7, rel=1e-6)


def test_kohya_copy_has_webui_keys_and_loads_like_the_diffusers_file(tiny_sd, parity_run):
    kohya_file = os.path.join(parity_run, train_inpo.KOHYA_LORA_WEIGHT_NAME)
    kohya = load_file(kohya_file)
    diffusers_format = load_file(os.path.join(parity_run, train_inpo.LORA_WEIGHT_NAME))
    assert kohya and all(key.startswith("lora_unet_") for key in kohya)
    suffixes = {key.split(".", 1)[1] for key in kohya}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    # One down, one up and one alpha per adapted layer of the diffusers-format file.
    assert len(kohya) == len(diffusers_format) // 2 * 3

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    before = generate(pipe)
    pipe.load_lora_weights(parity_run, weight_name=train_inpo.LORA_WEIGHT_NAME, adapter_name="diffusers")
    with_diffusers_file = generate(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(parity_run, weight_name=train_inpo.KOHYA_LORA_WEIGHT_NAME, adapter_name="kohya")
    with_kohya_file = generate(pipe)
    assert np.abs(with_diffusers_file - before).mean() > 1e-4
    np.testing.assert_allclose(with_kohya_file, with_diffusers_file, atol=1e-4)
