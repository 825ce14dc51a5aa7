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
"""Data pipeline and bad-input behaviour: every refusal says what is wrong before any model is loaded."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import train_inpo
from benchmarks.pickapic_format import encode_png
from conftest import launch, tiny_run_args
from fixtures import build_tiny_pickapic, build_tiny_sd


def png(color, size=(40, 48)):
    return encode_png(np.full((*size, 3), color, dtype=np.uint8))


def test_pairs_put_the_preferred_image_first_and_share_the_flip(tmp_path):
    rows = [
        {"caption": "a red square", "jpg_0": png(10), "jpg_1": png(240), "label_0": 0.0},
        {"caption": "a red square", "jpg_0": png(10), "jpg_1": png(240), "label_0": 1.0},
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "train-00000-of-00001.parquet"))
    dataset = train_inpo.load_preference_dataset(str(tmp_path), "train", log=lambda _: None)
    pairs = train_inpo.PreferencePairs(dataset, resolution=32, random_crop=True, hflip=True, seed=3)
    batch = train_inpo.collate_pairs([pairs[0], pairs[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    # Row order: winners of both pairs, then losers. Pair 0 prefers jpg_1 (bright), pair 1 prefers jpg_0 (dark).
    means = batch["pixel_values"].mean(dim=(1, 2, 3))
    assert means[0] > 0.8 and means[1] < -0.8 and means[2] < -0.8 and means[3] > 0.8
    # Same index, epoch and seed: same augmentation; another epoch draws anew.
    torch.testing.assert_close(pairs[0]["pixel_values"], pairs[0]["pixel_values"])


def test_resize_and_crop_reports_sdxl_micro_conditioning():
    image = Image.fromarray(np.zeros((60, 120, 3), dtype=np.uint8))  # h=60, w=120
    pixels, original_size, crop = train_inpo.resize_and_crop(image, 32, crop_fraction=(0.0, 1.0))
    assert pixels.shape == (3, 32, 32)
    assert original_size == (60, 120)
    assert crop == (0, 32)  # resized to 32x64, right-most crop
    _, _, centre = train_inpo.resize_and_crop(image, 32)
    assert centre == (0, 16)


def test_flip_is_shared_by_both_images_of_a_pair(tmp_path):
    left_white = np.zeros((32, 32, 3), dtype=np.uint8)
    left_white[:, :16] = 255
    rows = [
        {
            "caption": "a cat",
            "jpg_0": encode_png(left_white),
            "jpg_1": encode_png(left_white),
            "label_0": 1.0,
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "train-00000-of-00001.parquet"))
    dataset = train_inpo.load_preference_dataset(str(tmp_path), "train", log=lambda _: None)
    pairs = train_inpo.PreferencePairs(dataset, resolution=32, hflip=True, seed=0)
    flipped_seen = set()
    for epoch in range(8):
        pairs.set_epoch(epoch)
        winner, loser = pairs[0]["pixel_values"]
        torch.testing.assert_close(winner, loser)
        flipped_seen.add(bool(winner[0, 0, 0] < 0))
    assert flipped_seen == {True, False}


def test_ties_and_bad_rows_are_dropped_and_counted(tmp_path):
    bad_rows = [
        {"caption": "a red square", "jpg_0": b"not an image", "jpg_1": png(0), "label_0": 1.0},
        {"caption": "   ", "jpg_0": png(0), "jpg_1": png(255), "label_0": 0.0},
        {"caption": "a red square", "jpg_0": b"", "jpg_1": png(255), "label_0": 0.0},
    ]
    path = build_tiny_pickapic(str(tmp_path), num_pairs=4, extra_rows=bad_rows)
    messages = []
    dataset = train_inpo.load_preference_dataset(path, "train", log=messages.append)
    assert len(dataset) == 4
    assert "4 pairs kept, 1 ties dropped, 3 rows skipped" in messages[0]
    assert "jpg_0 does not decode" in messages[0] and "empty caption" in messages[0]
    assert messages[1].startswith("First skipped rows")


def test_missing_columns_are_named(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"caption": "x", "jpg_0": png(0), "label_0": 1.0}]),
        str(tmp_path / "train-00000-of-00001.parquet"),
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['jpg_1'\]"):
        train_inpo.load_preference_dataset(str(tmp_path), "train")


def test_only_ties_is_a_clear_error(tmp_path):
    rows = [{"caption": "x", "jpg_0": png(0), "jpg_1": png(9), "label_0": 0.5}]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="No usable preference pairs"):
        train_inpo.load_preference_dataset(str(tmp_path), "train", log=lambda _: None)


def test_wrong_split_says_how_to_fix(pickapic):
    with pytest.raises(ValueError, match="--dataset_split_name"):
        train_inpo.load_preference_dataset(pickapic, "validation")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"resolution": 36}, "not a multiple of 8"),
        ({"rank": 0}, "--rank must be at least 1"),
        ({"max_train_steps": 0}, "--max_train_steps must be at least 1"),
        ({"resume_from_checkpoint": "/nowhere/checkpoint-7"}, "does not exist"),
        ({"report_to": "wandb", "hub_token": "hf_secret"}, "leak the token"),
        ({"streaming": True, "max_train_steps": None}, "--streaming needs --max_train_steps"),
        ({"streaming": True, "dataloader_num_workers": 2}, "drop --dataloader_num_workers"),
        ({"streaming": True, "max_train_samples": 4}, "bound the run with --max_train_steps"),
        ({"use_adafactor": True, "use_8bit_adam": True}, "--use_adafactor and --use_8bit_adam"),
        ({"output_kohya_format": True, "train_mode": "full"}, "--output_kohya_format converts a LoRA"),
        ({"latent_source": "inverted_noise", "fresh_noise_mix": 1.5}, r"--fresh_noise_mix must be in \[0, 1\]"),
        ({"latent_source": "forward", "fresh_noise_mix": 0.5}, "needs --latent_source inverted_noise"),
        ({"latent_source": "forward", "inversion_eta": 0.1}, "it needs --latent_source inversion"),
        ({"latent_source": "forward", "inversion_steps": 5}, "--latent_source forward inverts nothing"),
        ({"latent_source": "inversion", "inversion_eta": -1}, "--inversion_eta must be >= 0"),
        ({"nccl_timeout": 0}, "--nccl_timeout must be at least 1 second"),
        ({"latent_source": "forward", "share_inverted_noise": True}, "it needs --latent_source inverted_noise"),
    ],
)
def test_bad_arguments_are_refused(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_inpo.parse_args(tiny_run_args("model", "data", str(tmp_path), **override))


def test_sample_prediction_is_refused(tmp_path):
    model = build_tiny_sd(str(tmp_path / "m"), prediction_type="sample")
    with pytest.raises(ValueError, match="predicts 'sample'"):
        train_inpo.check_model_family(model, None, None, want_sdxl=False)


def test_sdxl_checkpoint_given_to_sd_script_fails_before_training(tiny_sdxl, pickapic, tmp_path):
    result = launch("train_inpo.py", *tiny_run_args(tiny_sdxl, pickapic, str(tmp_path / "o")), check=False)
    assert result.returncode != 0
    assert "use train_inpo_sdxl.py" in result.stderr
    assert "Steps" not in result.stderr


def test_not_a_pipeline_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        train_inpo.check_model_family(str(tmp_path), None, None, want_sdxl=False)


def test_inversion_defaults_follow_the_latent_source(tmp_path):
    default = train_inpo.parse_args(tiny_run_args("model", "data", str(tmp_path)))
    assert (default.latent_source, default.fresh_noise_mix, default.inversion_steps) == ("inverted_noise", 0.9, 5)
    assert default.inversion_eta is None  # the reference inverts without noise: one noise per image
    paper = train_inpo.parse_args(tiny_run_args("model", "data", str(tmp_path), latent_source="inversion"))
    assert (paper.inversion_eta, paper.inversion_steps, paper.fresh_noise_mix) == (0.1, 10, None)  # the paper's
    dpo = train_inpo.parse_args(tiny_run_args("model", "data", str(tmp_path), latent_source="forward"))
    assert (dpo.fresh_noise_mix, dpo.inversion_eta) == (None, None)
