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
"""Tests of evaluate_inpo.py: metric math against hand-computed values, scorer heads, tuned-model detection, and
end-to-end runs on a tiny SD pipeline with a tiny random CLIP standing in for PickScore / CLIP / the aesthetic
model. Everything is built locally; nothing is downloaded."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import evaluate_inpo
from benchmarks.alignment_world import write_tiny_clip_tokenizer
from conftest import launch
from evaluate_inpo import (
    TunedModel,
    aesthetic_head_from_state_dict,
    bootstrap_ci,
    clip_score_from_embeddings,
    load_aesthetic_head,
    mean,
    pickscore_from_embeddings,
    resolve_tuned,
    summarize,
    win_indicators,
    win_rate,
)
from fixtures import CAPTIONS, build_tiny_pickapic


PROMPTS = CAPTIONS[:3]
CLIP_DIM = 16


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a LoRA for conftest's tiny pipeline, a CLIP scorer and an aesthetic head, saved like the real ones
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process runs too: threads only add contention for these tiny models on a small CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_random_lora(model_dir, pipeline_cls, path):
    """A LoRA on the model's UNet with random (non-zero) up-projections, so it visibly changes the images."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # zero-initialised by peft, which would make the LoRA a no-op
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_cls.save_lora_weights(path, unet_lora_layers=lora_layers)
    return path


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    return save_random_lora(tiny_sd, StableDiffusionPipeline, str(tmp_path_factory.mktemp("tiny-lora")))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (32 px images, 16-d projections) with a CLIPProcessor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = str(tmp_path_factory.mktemp("tiny-clip"))
    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer-src"))
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=CLIP_DIM)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def laion_head_state_dict(dims, seed=0):
    """State dict of the LAION improved-aesthetic MLP layout with Linear sizes dims[0] -> ... -> dims[5]."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for (index, d_in), d_out in zip(zip((0, 2, 4, 6, 7), dims[:-1]), dims[1:]):
        state_dict[f"layers.{index}.weight"] = torch.randn(d_out, d_in, generator=generator)
        state_dict[f"layers.{index}.bias"] = torch.randn(d_out, generator=generator)
    return state_dict


@pytest.fixture(scope="module")
def tiny_aesthetic_head(tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("aesthetic")), "head.pth")
    torch.save(laion_head_state_dict((CLIP_DIM, 8, 4, 4, 2, 1)), path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("prompts")), "prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # the blank line must be skipped
    return path


def run_script(*args):
    """evaluate_inpo.py as from the command line (in this process: see conftest.launch)."""
    return launch("evaluate_inpo.py", *args, check=False)


def base_args(tiny_sd, tuned, prompt_file, output_dir):
    return [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--tuned_model_name_or_path",
        tuned,
        "--prompt_file",
        prompt_file,
        "--output_dir",
        str(output_dir),
        "--num_inference_steps",
        "3",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--grid_cell_size",
        "32",
    ]


# --------------------------------------------------------------------------------------------------------------
# Metric math
# --------------------------------------------------------------------------------------------------------------


def test_mean_hand_computed():
    assert mean([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert mean(np.array([-1.5])) == -1.5
    with pytest.raises(ValueError):
        mean([])


def test_win_rate_counts_ties_as_half():
    base = [1.0, 2.0, 3.0, 4.0]
    tuned = [2.0, 2.0, 1.0, 5.0]  # win, tie, loss, win
    np.testing.assert_array_equal(win_indicators(base, tuned), [1.0, 0.5, 0.0, 1.0])
    assert win_rate(base, tuned) == 2.5 / 4
    assert win_rate(base, base) == 0.5
    assert win_rate(tuned, base) == 1 - 2.5 / 4
    with pytest.raises(ValueError, match="same length"):
        win_rate([1.0, 2.0], [1.0])


def test_bootstrap_ci_hand_computed_cases():
    # A constant sample resamples to the same mean every time.
    assert bootstrap_ci([3.0] * 5, num_samples=200) == (3.0, 3.0)
    assert bootstrap_ci([7.0], num_samples=50) == (7.0, 7.0)
    # Resampled means of {0, 1} are 0, ½, 1 with probabilities ¼, ½, ¼: the 2.5% / 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], num_samples=2000, seed=0) == (0.0, 1.0)


def test_bootstrap_ci_deterministic_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5.0, 2.0, size=50), rng.normal(5.0, 2.0, size=5000)
    low, high = bootstrap_ci(small, num_samples=1000, seed=3)
    assert (low, high) == bootstrap_ci(small, num_samples=1000, seed=3)
    assert (low, high) != bootstrap_ci(small, num_samples=1000, seed=4)
    assert low < mean(small) < high
    large_low, large_high = bootstrap_ci(large, num_samples=1000, seed=3)
    assert large_low < mean(large) < large_high
    # The standard error falls as 1/sqrt(N): 100x the data, about a tenth of the width.
    assert (large_high - large_low) < 0.2 * (high - low)
    # Half-width close to 1.96 sigma / sqrt(N).
    assert (high - low) / 2 == pytest.approx(1.96 * small.std() / np.sqrt(small.size), rel=0.25)


def test_summarize_reports_every_statistic():
    base, tuned = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 5.0]
    summary = summarize(base, tuned, num_samples=100, seed=0)
    assert summary["num_prompts"] == 4
    assert summary["base"]["mean"] == 2.5
    assert summary["tuned"]["mean"] == 2.5
    assert summary["delta"]["mean"] == 0.0
    assert summary["win_rate"]["mean"] == 0.625
    for name in ("base", "tuned", "delta", "win_rate"):
        low, high = summary[name]["ci95"]
        assert low <= summary[name]["mean"] <= high


# --------------------------------------------------------------------------------------------------------------
# Scores from embeddings and aesthetic heads
# --------------------------------------------------------------------------------------------------------------


def test_pickscore_and_clip_score_hand_computed():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [2.0, 0.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, 1.0], [4.0, 3.0], [-1.0, 0.0]])  # cos: 1, 0, 24/25, -1
    logit_scale = torch.tensor(np.log(100.0))
    torch.testing.assert_close(
        pickscore_from_embeddings(image, text, logit_scale), torch.tensor([100.0, 0.0, 96.0, -100.0])
    )
    torch.testing.assert_close(clip_score_from_embeddings(image, text), torch.tensor([100.0, 0.0, 96.0, 0.0]))


def test_single_linear_aesthetic_head_hand_computed(tmp_path):
    path = str(tmp_path / "linear.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}, path)
    head = load_aesthetic_head(path)
    # [3, 4] normalises to [0.6, 0.8]: 0.6 + 1.6 + 0.5.
    torch.testing.assert_close(head(torch.tensor([[3.0, 4.0], [30.0, 40.0]])), torch.tensor([2.7, 2.7]))


def test_laion_aesthetic_head_loads_and_matches_manual_forward(tiny_aesthetic_head):
    head = load_aesthetic_head(tiny_aesthetic_head)
    state_dict = torch.load(tiny_aesthetic_head, weights_only=True)
    x = torch.randn(3, CLIP_DIM, generator=torch.Generator().manual_seed(1))
    expected = x / x.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # no activations in this layout
        expected = expected @ state_dict[f"layers.{index}.weight"].T + state_dict[f"layers.{index}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected.squeeze(-1))


def test_bad_aesthetic_heads_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unrecognised aesthetic head"):
        aesthetic_head_from_state_dict({"fc.weight": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="one score"):
        aesthetic_head_from_state_dict({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
    broken = laion_head_state_dict((8, 6, 4, 4, 2, 1))
    broken["layers.2.weight"] = torch.zeros(4, 5)  # 6 -> 4 expected
    with pytest.raises(ValueError, match="do not chain"):
        aesthetic_head_from_state_dict(broken)
    with pytest.raises(ValueError, match="does not exist"):
        load_aesthetic_head(str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------------------------------------------
# Inputs: prompts and tuned-model detection
# --------------------------------------------------------------------------------------------------------------


def _args(**overrides):
    args = {"pretrained_model_name_or_path": "x", "tuned_model_name_or_path": "y", "output_dir": "z"}
    argv = []
    for key, value in {**args, **overrides}.items():
        argv += [f"--{key}", str(value)]
    return evaluate_inpo.parse_args(argv)


def test_prompt_file_skips_blank_lines_and_caps(prompt_file):
    assert evaluate_inpo.load_prompts(_args(prompt_file=prompt_file)) == PROMPTS
    assert evaluate_inpo.load_prompts(_args(prompt_file=prompt_file, max_prompts=2)) == PROMPTS[:2]


def test_prompt_dataset_column_split_and_errors(tmp_path):
    data_dir = build_tiny_pickapic(str(tmp_path / "pickapic"), num_pairs=6)
    prompts = evaluate_inpo.load_prompts(_args(prompt_dataset=data_dir, prompt_column="caption", max_prompts=4))
    assert prompts == CAPTIONS[:4]
    with pytest.raises(ValueError, match="'Prompt' is not a column"):
        evaluate_inpo.load_prompts(_args(prompt_dataset=data_dir, prompt_column="Prompt"))
    with pytest.raises(ValueError, match="could not load split 'test_unique'"):
        evaluate_inpo.load_prompts(_args(prompt_dataset=data_dir, prompt_split="test_unique"))
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_inpo.load_prompts(_args())


def test_resolve_tuned_detects_each_kind(tiny_sd, tiny_lora, tmp_path):
    lora_file = os.path.join(tiny_lora, "pytorch_lora_weights.safetensors")
    assert resolve_tuned(tiny_lora, "auto", None) == TunedModel("lora", tiny_lora, "pytorch_lora_weights.safetensors")
    assert resolve_tuned(lora_file, "auto", None) == TunedModel("lora", tiny_lora, "pytorch_lora_weights.safetensors")
    assert resolve_tuned(tiny_sd, "auto", None) == TunedModel("pipeline", tiny_sd)
    unet_dir = os.path.join(tiny_sd, "unet")
    assert resolve_tuned(unet_dir, "auto", None) == TunedModel("unet", unet_dir)
    assert resolve_tuned(tiny_sd, "unet", "unet") == TunedModel("unet", tiny_sd, subfolder="unet")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_tuned(str(tmp_path / "missing"), "auto", None)
    with pytest.raises(ValueError, match="holds neither"):
        resolve_tuned(str(tmp_path), "auto", None)


def test_generation_depends_on_seed_not_batch(tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = evaluate_inpo.load_pipeline(
        tiny_sd, DiffusionPipeline.load_config(tiny_sd), torch.device("cpu"), torch.float32
    )
    seeds = [10, 11, 12]
    batched = evaluate_inpo.generate_images(pipe, PROMPTS, seeds, str(tmp_path / "b3"), 3, "b3", num_inference_steps=2)
    single = evaluate_inpo.generate_images(pipe, PROMPTS, seeds, str(tmp_path / "b1"), 1, "b1", num_inference_steps=2)
    for a, b in zip(batched, single):
        np.testing.assert_allclose(_pixels(a), _pixels(b), atol=1)  # uint8 PNGs; allow one rounding step
    assert np.abs(_pixels(batched[0]) - _pixels(batched[1])).mean() > 1  # different seeds, different images


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def test_end_to_end_lora_with_all_local_scorers(
    tiny_sd, tiny_lora, tiny_clip, tiny_aesthetic_head, prompt_file, tmp_path
):
    output_dir = tmp_path / "eval"
    result = run_script(
        *base_args(tiny_sd, tiny_lora, prompt_file, output_dir),
        "--pickscore_model",
        tiny_clip,
        "--clip_model",
        tiny_clip,
        "--aesthetic_head",
        tiny_aesthetic_head,
        "--aesthetic_clip_model",
        tiny_clip,
        "--bootstrap_samples",
        "200",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "win rate" in result.stdout

    with open(output_dir / "scores.json") as f:
        report = json.load(f)
    assert report["config"]["tuned_type"] == "lora"
    assert report["config"]["pipeline_class"] == "StableDiffusionPipeline"
    assert set(report["summary"]) == {"pickscore", "clip_score", "aesthetic"}
    for name, summary in report["summary"].items():
        assert summary["num_prompts"] == len(PROMPTS)
        assert (2 * len(PROMPTS) * summary["win_rate"]["mean"]) % 1 == pytest.approx(0)  # wins and half-wins
        for model in ("base", "tuned"):
            low, high = summary[model]["ci95"]
            assert low <= summary[model]["mean"] <= high
    # The LoRA changes the images, so the scores move. (CLIP score is left out: a random CLIP's cosines sit around
    # zero and are often clamped to exactly 0 for both images.)
    for name in ("pickscore", "aesthetic"):
        assert report["summary"][name]["base"]["mean"] != report["summary"][name]["tuned"]["mean"], name
    clip_scores = [p["scores"]["clip_score"][model] for p in report["per_prompt"] for model in ("base", "tuned")]
    assert all(0 <= s <= 100 for s in clip_scores)
    per_prompt = report["per_prompt"]
    assert [p["prompt"] for p in per_prompt] == PROMPTS
    assert [p["seed"] for p in per_prompt] == [0, 1, 2]
    pickscores = [p["scores"]["pickscore"]["tuned"] for p in per_prompt]
    assert report["summary"]["pickscore"]["tuned"]["mean"] == pytest.approx(np.mean(pickscores))

    with open(output_dir / "scores.csv") as f:
        rows = f.read().strip().splitlines()
    assert rows[0] == "prompt_index,prompt,seed,scorer,base,tuned"
    assert len(rows) == 1 + 3 * len(PROMPTS)
    assert rows[1].startswith(f"0,{PROMPTS[0]},0,pickscore,")

    from PIL import Image

    with Image.open(output_dir / "grid.png") as grid:
        assert grid.size == (2 * 32, len(PROMPTS) * 32)
    for kind in ("base", "tuned"):
        assert sorted(os.listdir(output_dir / "images" / kind)) == ["00000.png", "00001.png", "00002.png"]
    base_image, tuned_image = (_pixels(output_dir / "images" / kind / "00000.png") for kind in ("base", "tuned"))
    assert np.abs(base_image - tuned_image).mean() > 1


def test_sdxl_lora_end_to_end(tiny_sdxl, tiny_clip, tiny_aesthetic_head, prompt_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    lora = save_random_lora(tiny_sdxl, StableDiffusionXLPipeline, str(tmp_path / "sdxl-lora"))
    output_dir = tmp_path / "eval"
    scorer_args = ["--aesthetic_head", tiny_aesthetic_head, "--aesthetic_clip_model", tiny_clip]
    evaluate_inpo.main(base_args(tiny_sdxl, lora, prompt_file, output_dir) + scorer_args + ["--max_prompts", "2"])
    with open(output_dir / "scores.json") as f:
        report = json.load(f)
    assert report["config"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert report["config"]["tuned_type"] == "lora"
    summary = report["summary"]["aesthetic"]
    assert summary["num_prompts"] == 2
    assert summary["base"]["mean"] != summary["tuned"]["mean"]


@pytest.mark.parametrize("tuned_kind", ["pipeline", "unet"])
def test_identical_tuned_model_ties_everywhere(tiny_sd, tiny_clip, prompt_file, tmp_path, tuned_kind):
    # The base model passed back as the "tuned" one: same seeds give the same images, so every prompt is a tie.
    tuned = tiny_sd if tuned_kind == "pipeline" else os.path.join(tiny_sd, "unet")
    output_dir = tmp_path / "eval"
    evaluate_inpo.main(
        base_args(tiny_sd, tuned, prompt_file, output_dir) + ["--clip_model", tiny_clip, "--max_prompts", "2"]
    )
    with open(output_dir / "scores.json") as f:
        report = json.load(f)
    assert report["config"]["tuned_type"] == tuned_kind
    summary = report["summary"]["clip_score"]
    assert summary["win_rate"]["mean"] == 0.5
    assert summary["delta"] == {"mean": 0.0, "ci95": [0.0, 0.0]}


def test_missing_scorer_path_fails_before_generation(tiny_sd, tiny_lora, prompt_file, tmp_path):
    missing = str(tmp_path / "no-such-pickscore")
    output_dir = tmp_path / "eval"
    result = run_script(*base_args(tiny_sd, tiny_lora, prompt_file, output_dir), "--pickscore_model", missing)
    assert result.returncode != 0
    assert missing in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (output_dir / "images").exists()


@pytest.mark.skipif(importlib.util.find_spec("hpsv2") is not None, reason="hpsv2 is installed here")
def test_missing_optional_package_is_explained(tiny_sd, tiny_lora, prompt_file, tmp_path):
    with pytest.raises(SystemExit, match="pip install hpsv2"):
        evaluate_inpo.main(base_args(tiny_sd, tiny_lora, prompt_file, tmp_path / "eval") + ["--hpsv2"])
    assert not (tmp_path / "eval" / "images").exists()
