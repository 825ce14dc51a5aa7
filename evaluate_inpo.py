#!/usr/bin/env python
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
"""Evaluate an InPO run: generate images with the base model and with the tuned one, then score both.

Every prompt is generated twice with the same seed (`--seed` + prompt index): once with the base pipeline and once
with the tuned result, which may be a LoRA folder (loaded with `pipe.load_lora_weights`), a fine-tuned UNet folder
or a full pipeline folder. SD 1.x/2.x and SDXL are both supported; the pipeline class is read from model_index.json.

Prompt sets (`--prompt_file` for a text file with one prompt per line, or `--prompt_dataset` for anything
`datasets.load_dataset` can stream):
  * Pick-a-Pic v2 test captions:  --prompt_dataset yuvalkirstain/pickapic_v2 --prompt_split test_unique
                                  --prompt_column caption           (500 unique captions)
  * PartiPrompts:                 --prompt_dataset nateraw/parti-prompts --prompt_split train --prompt_column Prompt
  * HPSv2 benchmark prompts:      write them to a text file first, then use --prompt_file hps_prompts.txt:
        python -c "import hpsv2; p = hpsv2.benchmark_prompts('all');
                   open('hps_prompts.txt', 'w').write('\\n'.join(x for s in p.values() for x in s))"
Datasets are streamed, so only what is read is downloaded (all of Pick-a-Pic v2 is hundreds of GB of images).

Scorers (each optional; all paths may be local folders or Hub ids and are checked before any image is generated):
  * PickScore    --pickscore_model yuvalkirstain/PickScore_v1
                 --pickscore_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K
                 score = exp(logit_scale) * cos(image, text)  (roughly 20-23 for SD models)
  * CLIP score   --clip_model openai/clip-vit-large-patch14;  score = 100 * max(cos(image, text), 0)
  * Aesthetic    --aesthetic_head sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor MLP, or a
                 single Linear head) on L2-normalised image embeddings of --aesthetic_clip_model
  * HPSv2        --hpsv2 (needs `pip install hpsv2`; weights from the package or --hpsv2_checkpoint)
  * ImageReward  --imagereward_model ImageReward-v1.0 (needs `pip install image-reward`)

Outputs in --output_dir:
  images/base/00000.png, images/tuned/00000.png, ...   one image per prompt and model
  grid.png      rows = prompts (the first --grid_max_prompts), columns = base | tuned
  scores.json   {"config", "summary", "per_prompt"}: per scorer the base and tuned means with bootstrap 95%
                intervals, the paired mean difference (tuned - base) and the win rate of tuned over base
                (ties count 1/2), plus every per-image score
  scores.csv    one row per prompt and scorer: prompt_index, prompt, seed, scorer, base, tuned

Example:
    python evaluate_inpo.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --tuned_model_name_or_path inpo-sd15-lora --prompt_dataset yuvalkirstain/pickapic_v2 \\
        --prompt_split test_unique --pickscore_model yuvalkirstain/PickScore_v1 \\
        --pickscore_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K --output_dir eval_pickapic
"""

import argparse
import csv
import gc
import importlib
import itertools
import json
import os
import re
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm


TUNED_TYPES = ("auto", "lora", "unet", "pipeline")
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# Linear layers of LAION's improved-aesthetic-predictor MLP; indices 1, 3, 5 are dropouts and it has no activations.
LAION_AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)


# --------------------------------------------------------------------------------------------------------------
# Metric math
# --------------------------------------------------------------------------------------------------------------


def mean(values):
    """Mean of a non-empty (N,) sequence, as a Python float."""
    values = _as_1d(values)
    return float(values.mean())


def bootstrap_ci(values, num_samples=1000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of the mean of `values` (N,): resample N values with replacement
    `num_samples` times and take the (1 ± confidence) / 2 quantiles of the resampled means.

    Deterministic for a given `seed`. Returns (low, high) as floats.
    """
    values = _as_1d(values)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, values.size, size=(num_samples, values.size))
    resampled_means = values[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled_means, [tail, 1.0 - tail])
    return float(low), float(high)


def win_indicators(base, tuned):
    """Per-prompt outcome of tuned vs base: 1 if tuned scores higher, 0.5 on an exact tie, 0 otherwise.

    Args:
        base, tuned: (N,) scores of the same prompts and seeds.
    Returns:
        (N,) float array.
    """
    base, tuned = _as_1d(base), _as_1d(tuned)
    if base.shape != tuned.shape:
        raise ValueError(f"base and tuned must have the same length, got {base.size} and {tuned.size}")
    return np.where(tuned > base, 1.0, np.where(tuned == base, 0.5, 0.0))


def win_rate(base, tuned):
    """Fraction of prompts on which tuned beats base, ties counting ½."""
    return mean(win_indicators(base, tuned))


def summarize(base, tuned, num_samples=1000, seed=0):
    """Means with bootstrap intervals for base, tuned, their paired difference and the win rate.

    The same seed is used for every statistic so they are all computed on the same resampled prompt sets.
    """
    wins = win_indicators(base, tuned)  # also checks that the lengths match
    base, tuned = _as_1d(base), _as_1d(tuned)
    statistics = {"base": base, "tuned": tuned, "delta": tuned - base, "win_rate": wins}
    summary = {
        name: {"mean": mean(values), "ci95": list(bootstrap_ci(values, num_samples, seed=seed))}
        for name, values in statistics.items()
    }
    summary["num_prompts"] = int(base.size)
    return summary


def _as_1d(values):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of scores, got shape {values.shape}")
    return values


# --------------------------------------------------------------------------------------------------------------
# Scores from embeddings
# --------------------------------------------------------------------------------------------------------------


def pickscore_from_embeddings(image_embeds, text_embeds, logit_scale):
    """PickScore: exp(logit_scale) · cos(image, text).

    Args:
        image_embeds, text_embeds: (N, D) projected CLIP embeddings (any norm).
        logit_scale: scalar tensor, the model's learned log temperature.
    Returns:
        (N,) scores.
    """
    return logit_scale.exp() * F.cosine_similarity(image_embeds, text_embeds, dim=-1)


def clip_score_from_embeddings(image_embeds, text_embeds):
    """CLIP score: 100 · max(cos(image, text), 0). (N, D), (N, D) -> (N,)."""
    return 100.0 * F.cosine_similarity(image_embeds, text_embeds, dim=-1).clamp(min=0)


class AestheticHead(torch.nn.Module):
    """A linear or LAION-MLP head on L2-normalised CLIP image embeddings: (N, D) -> (N,)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, image_embeds):
        return self.layers(F.normalize(image_embeds, dim=-1)).squeeze(-1)


def aesthetic_head_from_state_dict(state_dict):
    """Build an `AestheticHead` matching `state_dict`.

    Accepted layouts: LAION improved-aesthetic-predictor (`layers.{0,2,4,6,7}.{weight,bias}`, e.g.
    Linear(768→1024→128→64→16→1)) or a single Linear (`weight` (1, D), `bias` (1,)).
    """
    keys = set(state_dict)
    if keys == {"weight", "bias"}:
        linear_keys = [("weight", "bias")]
    elif keys == {f"layers.{i}.{p}" for i in LAION_AESTHETIC_LINEAR_INDICES for p in ("weight", "bias")}:
        linear_keys = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in LAION_AESTHETIC_LINEAR_INDICES]
    else:
        raise ValueError(
            "unrecognised aesthetic head: expected keys {weight, bias} (single Linear) or "
            f"layers.{{0,2,4,6,7}}.{{weight,bias}} (LAION MLP), got {sorted(keys)}"
        )
    linears = [torch.nn.Linear(state_dict[w].shape[1], state_dict[w].shape[0]) for w, _ in linear_keys]
    for previous, layer in zip(linears, linears[1:]):
        if layer.in_features != previous.out_features:
            raise ValueError(f"the aesthetic head's layer sizes do not chain: {previous} is followed by {layer}")
    if linears[-1].out_features != 1:
        raise ValueError(f"the aesthetic head must output one score, its last layer has {linears[-1].out_features}")
    if len(linears) == 1:
        head = AestheticHead(torch.nn.Sequential(linears[0]))
        # The single-Linear layout names its tensors without the `layers.0.` prefix.
        state_dict = {f"layers.0.{k}": v for k, v in state_dict.items()}
    else:
        # Identity where the training layout had dropouts, so the indices (and state_dict keys) line up.
        modules = [
            linears[0],
            torch.nn.Identity(),
            linears[1],
            torch.nn.Identity(),
            linears[2],
            torch.nn.Identity(),
            linears[3],
            linears[4],
        ]
        head = AestheticHead(torch.nn.Sequential(*modules))
    try:
        head.load_state_dict(state_dict)
    except RuntimeError as error:  # e.g. a bias whose size does not match its weight
        raise ValueError(f"inconsistent aesthetic head tensors: {error}") from error
    return head.eval()


def load_aesthetic_head(path):
    """Read a head state_dict from a .safetensors or torch (.pth/.pt/.bin) file and build it."""
    if not os.path.isfile(path):
        raise ValueError(f"--aesthetic_head: {path!r} does not exist or is not a file.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--aesthetic_head: could not read {path!r} as a state_dict ({error})") from error
    try:
        return aesthetic_head_from_state_dict(state_dict)
    except ValueError as error:
        raise ValueError(f"--aesthetic_head {path!r}: {error}") from error


# --------------------------------------------------------------------------------------------------------------
# Scorers: validated (cheaply) at construction, weights loaded by `load(device)` only after generation
# --------------------------------------------------------------------------------------------------------------


def _require_exists_or_hub_id(flag, path):
    """Fail fast on a path that cannot be a Hub id and does not exist; Hub ids are checked when first read."""
    if os.path.exists(path):
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise ValueError(f"{flag}: {path!r} does not exist.")


def _load_or_explain(flag, path, loader):
    """Run `loader(path)`, turning a failure into an error that names the flag and the path."""
    _require_exists_or_hub_id(flag, path)
    try:
        return loader(path)
    except Exception as error:
        raise ValueError(f"{flag}: could not load {path!r} (not a valid local folder or Hub repo): {error}") from error


def _clip_image_embeds(model, image_processor, paths, device):
    """Projected CLIP image embeddings (N, D) of the N image files at `paths`."""
    images = [Image.open(path).convert("RGB") for path in paths]
    pixel_values = image_processor(images=images, return_tensors="pt").pixel_values.to(device)
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


class ClipScorer:
    """PickScore or CLIP score from a transformers `CLIPModel` and its processor."""

    def __init__(self, name, model_flag, model_path, processor_flag, processor_path, score_fn):
        """`score_fn(image_embeds (N, D), text_embeds (N, D), logit_scale) -> (N,)`."""
        from transformers import AutoConfig, AutoProcessor, CLIPConfig

        self.name, self.model_path, self.score_fn = name, model_path, score_fn
        config = _load_or_explain(model_flag, model_path, AutoConfig.from_pretrained)
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"{model_flag}: {model_path!r} is a {type(config).__name__}, expected a CLIP model.")
        self.max_text_length = config.text_config.max_position_embeddings
        self.processor = _load_or_explain(processor_flag, processor_path, AutoProcessor.from_pretrained)
        if not (hasattr(self.processor, "tokenizer") and hasattr(self.processor, "image_processor")):
            raise ValueError(f"{processor_flag}: {processor_path!r} lacks a tokenizer and image processor pair.")

    def load(self, device):
        """Returns score(prompts, base_paths, tuned_paths) -> (base (N,), tuned (N,)) numpy arrays."""
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(self.model_path).to(device).eval()

        @torch.no_grad()
        def score(prompts, base_paths, tuned_paths):
            text = self.processor.tokenizer(
                prompts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
            )
            text_embeds = model.text_projection(
                model.text_model(
                    input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device)
                ).pooler_output
            )
            image_embeds = _clip_image_embeds(model, self.processor.image_processor, base_paths + tuned_paths, device)
            # Base images come first, then tuned ones, so the text embeddings are repeated once.
            scores = self.score_fn(image_embeds, text_embeds.repeat(2, 1), model.logit_scale).float().cpu().numpy()
            return scores[: len(prompts)], scores[len(prompts) :]

        return score


class AestheticScorer:
    """LAION-style aesthetic score: an MLP head on the L2-normalised CLIP image embedding."""

    name = "aesthetic"

    def __init__(self, head_path, clip_path):
        from transformers import AutoConfig, AutoImageProcessor, CLIPConfig

        self.head = load_aesthetic_head(head_path)
        self.clip_path = clip_path
        config = _load_or_explain("--aesthetic_clip_model", clip_path, AutoConfig.from_pretrained)
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"--aesthetic_clip_model: {clip_path!r} is a {type(config).__name__}, expected CLIP.")
        in_features = self.head.layers[0].in_features
        if in_features != config.projection_dim:
            raise ValueError(
                f"--aesthetic_head expects {in_features}-d embeddings but {clip_path!r} produces "
                f"{config.projection_dim}-d ones (LAION's heads need openai/clip-vit-large-patch14)."
            )
        self.image_processor = _load_or_explain(
            "--aesthetic_clip_model", clip_path, AutoImageProcessor.from_pretrained
        )

    def load(self, device):
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(self.clip_path).to(device).eval()
        head = self.head.to(device)

        @torch.no_grad()
        def score(prompts, base_paths, tuned_paths):
            image_embeds = _clip_image_embeds(model, self.image_processor, base_paths + tuned_paths, device)
            scores = head(image_embeds).float().cpu().numpy()
            return scores[: len(prompts)], scores[len(prompts) :]

        return score


def _import_optional(module, install_hint, scorer):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"{scorer} needs the `{module}` package: {install_hint} ({error})") from error


class HPSv2Scorer:
    """HPSv2 through the `hpsv2` package, which picks its own device and (re)loads its checkpoint on every call."""

    name = "hpsv2"

    def __init__(self, version, checkpoint):
        self.img_score = _import_optional("hpsv2.img_score", "pip install hpsv2", "--hpsv2")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise ValueError(f"--hpsv2_checkpoint: {checkpoint!r} does not exist or is not a file.")
        self.version, self.checkpoint = version, checkpoint

    def load(self, device):
        def score(prompts, base_paths, tuned_paths):
            pairs = [
                self.img_score.score([b, t], prompt, cp=self.checkpoint, hps_version=self.version)
                for prompt, b, t in zip(prompts, base_paths, tuned_paths)
            ]
            pairs = np.asarray(pairs, dtype=np.float64)
            return pairs[:, 0], pairs[:, 1]

        return score


class ImageRewardScorer:
    """ImageReward through the `ImageReward` package (a model name it knows, or a local checkpoint file)."""

    name = "imagereward"

    def __init__(self, model):
        self.module = _import_optional("ImageReward", "pip install image-reward", "--imagereward_model")
        if model not in self.module.available_models() and not os.path.isfile(model):
            raise ValueError(
                f"--imagereward_model: {model!r} does not exist and is not one of {self.module.available_models()}."
            )
        self.model = model

    def load(self, device):
        model = self.module.load(self.model, device=device)

        @torch.no_grad()
        def score(prompts, base_paths, tuned_paths):
            pairs = [model.score(prompt, [b, t]) for prompt, b, t in zip(prompts, base_paths, tuned_paths)]
            pairs = np.asarray(pairs, dtype=np.float64)
            return pairs[:, 0], pairs[:, 1]

        return score


def build_scorers(args):
    """Validate every requested scorer (paths, packages, head layout) without loading big weights."""
    if args.pickscore_processor is not None and args.pickscore_model is None:
        raise ValueError("--pickscore_processor needs --pickscore_model.")
    if args.hpsv2_checkpoint is not None and not args.hpsv2:
        raise ValueError("--hpsv2_checkpoint needs --hpsv2.")
    scorers = []
    if args.pickscore_model is not None:
        processor_flag = "--pickscore_model" if args.pickscore_processor is None else "--pickscore_processor"
        processor = args.pickscore_processor or args.pickscore_model
        scorers.append(
            ClipScorer(
                "pickscore",
                "--pickscore_model",
                args.pickscore_model,
                processor_flag,
                processor,
                pickscore_from_embeddings,
            )
        )
    if args.clip_model is not None:
        scorers.append(
            ClipScorer(
                "clip_score",
                "--clip_model",
                args.clip_model,
                "--clip_model",
                args.clip_model,
                lambda image, text, _: clip_score_from_embeddings(image, text),
            )
        )
    if args.aesthetic_head is not None:
        scorers.append(AestheticScorer(args.aesthetic_head, args.aesthetic_clip_model))
    if args.hpsv2:
        scorers.append(HPSv2Scorer(args.hpsv2_version, args.hpsv2_checkpoint))
    if args.imagereward_model is not None:
        scorers.append(ImageRewardScorer(args.imagereward_model))
    return scorers


def score_all(scorer, device, prompts, base_paths, tuned_paths, batch_size):
    """Run one scorer over all prompts in batches. Returns (base (N,), tuned (N,)) numpy arrays."""
    score = scorer.load(device)
    base, tuned = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"scoring {scorer.name}"):
        end = start + batch_size
        b, t = score(prompts[start:end], base_paths[start:end], tuned_paths[start:end])
        base.append(b)
        tuned.append(t)
    return np.concatenate(base).astype(np.float64), np.concatenate(tuned).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def load_prompts(args):
    """The prompt list: non-empty lines of --prompt_file, or --prompt_column of --prompt_dataset, capped at
    --max_prompts."""
    if (args.prompt_file is None) == (args.prompt_dataset is None):
        raise ValueError("Pass exactly one of --prompt_file and --prompt_dataset.")
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise ValueError(f"--prompt_file: {args.prompt_file!r} does not exist.")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = (line.strip() for line in f)
            prompts = list(itertools.islice((p for p in prompts if p), args.max_prompts))
    else:
        prompts = _load_dataset_prompts(args.prompt_dataset, args.prompt_split, args.prompt_column, args.max_prompts)
    if not prompts:
        raise ValueError("The prompt set is empty.")
    return prompts


def _load_dataset_prompts(name, split, column, max_prompts):
    import datasets

    _require_exists_or_hub_id("--prompt_dataset", name)
    try:
        # Streaming reads only the rows we use instead of downloading and preparing every split.
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:
        raise ValueError(f"--prompt_dataset: could not load split {split!r} of {name!r}: {error}") from error
    if dataset.column_names is not None and column not in dataset.column_names:
        raise ValueError(f"--prompt_column: {column!r} is not a column of {name!r}; columns: {dataset.column_names}")
    rows = itertools.islice(dataset.select_columns([column]), max_prompts)
    return [str(row[column]).strip() for row in rows]


# --------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------


def read_pipeline_config(flag, path):
    """model_index.json of a pipeline folder or Hub repo (also the early check that it exists)."""
    from diffusers import DiffusionPipeline

    return _load_or_explain(flag, path, DiffusionPipeline.load_config)


class TunedModel(NamedTuple):
    """How to apply the tuned result: `kind` in lora/unet/pipeline; `weight_name` (LoRA) and `subfolder` (UNet)
    are passed on to diffusers."""

    kind: str
    path: str
    weight_name: str | None = None
    subfolder: str | None = None


def resolve_tuned(path, tuned_type, subfolder):
    """Check the tuned result exists and decide how to apply it; returns a `TunedModel`.

    `auto` inspects a local path: a LoRA weight file or a folder holding pytorch_lora_weights.* is a LoRA, a
    model_index.json a full pipeline, a config.json (or unet/config.json) a UNet.
    """
    flag = "--tuned_model_name_or_path"
    if subfolder is not None and tuned_type not in ("auto", "unet"):
        raise ValueError(f"--tuned_subfolder applies to a UNet, not to --tuned_type {tuned_type}.")
    if os.path.isfile(path) and tuned_type in ("auto", "lora"):
        return TunedModel("lora", os.path.dirname(path) or ".", weight_name=os.path.basename(path))
    if tuned_type == "pipeline":
        read_pipeline_config(flag, path)
        return TunedModel("pipeline", path)
    if tuned_type != "auto":
        _require_exists_or_hub_id(flag, path)
        return TunedModel(tuned_type, path, subfolder=subfolder)
    if not os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} does not exist locally; for a Hub repo also pass --tuned_type.")
    if subfolder is not None:
        if not os.path.isfile(os.path.join(path, subfolder, "config.json")):
            raise ValueError(f"--tuned_subfolder: {os.path.join(path, subfolder)!r} has no UNet config.json.")
        return TunedModel("unet", path, subfolder=subfolder)
    for weight_name in LORA_WEIGHT_NAMES:
        if os.path.isfile(os.path.join(path, weight_name)):
            return TunedModel("lora", path, weight_name=weight_name)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return TunedModel("pipeline", path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return TunedModel("unet", path)
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        return TunedModel("unet", path, subfolder="unet")
    raise ValueError(
        f"{flag}: {path!r} holds neither a LoRA ({' or '.join(LORA_WEIGHT_NAMES)}), a pipeline (model_index.json) "
        "nor a UNet (config.json or unet/config.json)."
    )


def load_pipeline(path, pipeline_config, device, dtype):
    from diffusers import AutoPipelineForText2Image

    # The SD 1.x safety checker replaces flagged images with black ones, which would then be scored.
    extra = {"safety_checker": None} if "safety_checker" in pipeline_config else {}
    pipe = AutoPipelineForText2Image.from_pretrained(path, torch_dtype=dtype, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def swap_in_tuned_weights(pipe, tuned, device, dtype):
    """Turn the base pipeline into the tuned one in place, for a LoRA or a UNet result."""
    if tuned.kind == "lora":
        pipe.load_lora_weights(tuned.path, weight_name=tuned.weight_name)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(tuned.path, subfolder=tuned.subfolder, torch_dtype=dtype)
        pipe.unet = unet.to(device)


def generate_images(pipe, prompts, seeds, out_dir, batch_size, desc, **call_kwargs):
    """Generate one image per prompt into `out_dir/{index:05d}.png`. Returns the N paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with tqdm(total=len(prompts), desc=desc, unit="img") as progress:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            # One CPU generator per prompt: its initial noise depends only on its seed, not on batch or device.
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + batch_size]]
            images = pipe(batch, generator=generators, output_type="pil", **call_kwargs).images
            for index, image in enumerate(images, start):
                paths.append(os.path.join(out_dir, f"{index:05d}.png"))
                image.save(paths[-1])
            progress.update(len(batch))
    return paths


def make_grid(base_paths, tuned_paths, cell_size):
    """Rows = prompts, columns = base | tuned; images are scaled so their longer side is `cell_size`.

    Returns a PIL image of size (2·w, N·h) for images scaled to (w, h).
    """
    first = Image.open(base_paths[0])
    scale = cell_size / max(first.size)
    w, h = round(first.width * scale), round(first.height * scale)
    grid = Image.new("RGB", (2 * w, len(base_paths) * h))
    for row, pair in enumerate(zip(base_paths, tuned_paths)):
        for column, path in enumerate(pair):
            grid.paste(Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC), (column * w, row * h))
    return grid


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def write_reports(output_dir, config, prompts, seeds, base_paths, tuned_paths, scores, summary):
    """scores.json (config, summary, per-prompt scores) and scores.csv (one row per prompt and scorer)."""
    per_prompt = [
        {
            "prompt_index": i,
            "prompt": prompt,
            "seed": seeds[i],
            "base_image": os.path.relpath(base_paths[i], output_dir),
            "tuned_image": os.path.relpath(tuned_paths[i], output_dir),
            "scores": {name: {"base": float(b[i]), "tuned": float(t[i])} for name, (b, t) in scores.items()},
        }
        for i, prompt in enumerate(prompts)
    ]
    with open(os.path.join(output_dir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config, "summary": summary, "per_prompt": per_prompt}, f, indent=2)
    with open(os.path.join(output_dir, "scores.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt_index", "prompt", "seed", "scorer", "base", "tuned"])
        for name, (b, t) in scores.items():
            for i, prompt in enumerate(prompts):
                writer.writerow([i, prompt, seeds[i], name, repr(float(b[i])), repr(float(t[i]))])


def format_summary(summary):
    """A fixed-width table: one row per scorer with means, 95% intervals and the win rate."""

    def cell(stat):
        return f"{stat['mean']:.4f} [{stat['ci95'][0]:.4f}, {stat['ci95'][1]:.4f}]"

    header = f"{'scorer':<12} {'base':<28} {'tuned':<28} {'tuned - base':<28} {'win rate (tuned > base)':<28}"
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        lines.append(
            f"{name:<12} {cell(s['base']):<28} {cell(s['tuned']):<28} {cell(s['delta']):<28} {cell(s['win_rate']):<28}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Base pipeline (folder or Hub id), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.",
    )
    models.add_argument(
        "--tuned_model_name_or_path",
        required=True,
        help="The trained result: a LoRA folder or weight file, a UNet folder, or a full pipeline.",
    )
    models.add_argument(
        "--tuned_type",
        choices=TUNED_TYPES,
        default="auto",
        help="How to apply --tuned_model_name_or_path; `auto` inspects a local path (Hub ids need an explicit type).",
    )
    models.add_argument(
        "--tuned_subfolder",
        default=None,
        help="For a UNet result: the subfolder holding it, e.g. `unet` in a whole-pipeline repo.",
    )

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt_file", default=None, help="Text file with one prompt per line.")
    prompts.add_argument(
        "--prompt_dataset", default=None, help="Dataset name or folder for datasets.load_dataset (streamed)."
    )
    prompts.add_argument("--prompt_split", default="train", help="Split of --prompt_dataset.")
    prompts.add_argument("--prompt_column", default="caption", help="Column of --prompt_dataset holding prompts.")
    prompts.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts.")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--seed", type=int, default=0, help="Prompt i is generated with seed `seed + i`.")
    generation.add_argument("--num_inference_steps", type=int, default=50)
    generation.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance; default: the pipeline's (7.5 SD, 5.0 SDXL).",
    )
    generation.add_argument(
        "--resolution", type=int, default=None, help="Square image size; default: the model's native size."
    )
    generation.add_argument("--batch_size", type=int, default=4, help="Prompts per generation and scoring batch.")
    generation.add_argument("--device", default=None, help="torch device; default: cuda, then mps, then cpu.")
    generation.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Pipeline dtype; default: fp16 on CUDA, fp32 elsewhere. Scorers always run in fp32.",
    )

    scoring = parser.add_argument_group("scorers (all optional)")
    scoring.add_argument(
        "--pickscore_model", default=None, help="PickScore CLIPModel, e.g. yuvalkirstain/PickScore_v1."
    )
    scoring.add_argument(
        "--pickscore_processor",
        default=None,
        help="Processor for PickScore, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default: the model's own.",
    )
    scoring.add_argument(
        "--clip_model", default=None, help="CLIPModel + processor for CLIP score, e.g. openai/clip-vit-large-patch14."
    )
    scoring.add_argument(
        "--aesthetic_head",
        default=None,
        help="Aesthetic head state_dict file (.pth/.pt/.bin/.safetensors): LAION "
        "improved-aesthetic-predictor MLP or a single Linear.",
    )
    scoring.add_argument(
        "--aesthetic_clip_model",
        default="openai/clip-vit-large-patch14",
        help="CLIPModel + image processor whose image embeddings feed --aesthetic_head.",
    )
    scoring.add_argument("--hpsv2", action="store_true", help="Score with HPSv2 (needs `pip install hpsv2`).")
    scoring.add_argument("--hpsv2_version", choices=("v2.0", "v2.1"), default="v2.1")
    scoring.add_argument(
        "--hpsv2_checkpoint", default=None, help="Local HPSv2 checkpoint; default: the package downloads xswu/HPSv2."
    )
    scoring.add_argument(
        "--imagereward_model",
        default=None,
        help="ImageReward-v1.0 or a local checkpoint file (needs `pip install image-reward`).",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="inpo-eval", help="Where images, grid.png and scores go.")
    output.add_argument("--bootstrap_samples", type=int, default=1000, help="Bootstrap resamples for the 95%% CIs.")
    output.add_argument("--bootstrap_seed", type=int, default=0)
    output.add_argument("--grid_max_prompts", type=int, default=16, help="Rows of grid.png (first N prompts).")
    output.add_argument("--grid_cell_size", type=int, default=256, help="Longer side of each image in grid.png.")
    args = parser.parse_args(argv)

    for flag in (
        "max_prompts",
        "batch_size",
        "num_inference_steps",
        "bootstrap_samples",
        "grid_max_prompts",
        "grid_cell_size",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    return args


def pick_device(requested):
    if requested is not None:
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"--device: {error}") from error
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(mixed_precision, device):
    if mixed_precision is None:
        mixed_precision = "fp16" if device.type == "cuda" else "no"
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    # Everything that can be wrong with the inputs is checked before the first image is generated.
    try:
        prompts = load_prompts(args)
        base_config = read_pipeline_config("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
        tuned = resolve_tuned(args.tuned_model_name_or_path, args.tuned_type, args.tuned_subfolder)
        scorers = build_scorers(args)
        device = pick_device(args.device)
    except ValueError as error:
        sys.exit(f"error: {error}")

    dtype = pick_dtype(args.mixed_precision, device)
    seeds = [args.seed + i for i in range(len(prompts))]
    call_kwargs = {"num_inference_steps": args.num_inference_steps}
    if args.guidance_scale is not None:
        call_kwargs["guidance_scale"] = args.guidance_scale
    if args.resolution is not None:
        call_kwargs["height"] = call_kwargs["width"] = args.resolution
    print(f"{len(prompts)} prompts, {len(scorers)} scorers, tuned result: {tuned.kind}, device {device}, {dtype}")

    image_dir = os.path.join(args.output_dir, "images")
    pipe = load_pipeline(args.pretrained_model_name_or_path, base_config, device, dtype)
    pipeline_class = type(pipe).__name__
    base_paths = generate_images(
        pipe, prompts, seeds, os.path.join(image_dir, "base"), args.batch_size, "base", **call_kwargs
    )
    if tuned.kind == "pipeline":
        del pipe  # before loading the second pipeline, so both never share the accelerator
        free_memory(device)
        pipe = load_pipeline(tuned.path, read_pipeline_config("--tuned_model_name_or_path", tuned.path), device, dtype)
    else:
        swap_in_tuned_weights(pipe, tuned, device, dtype)
    tuned_paths = generate_images(
        pipe, prompts, seeds, os.path.join(image_dir, "tuned"), args.batch_size, "tuned", **call_kwargs
    )
    del pipe
    free_memory(device)

    grid_rows = min(args.grid_max_prompts, len(prompts))
    make_grid(base_paths[:grid_rows], tuned_paths[:grid_rows], args.grid_cell_size).save(
        os.path.join(args.output_dir, "grid.png")
    )

    scores, summary = {}, {}
    for scorer in scorers:
        scores[scorer.name] = score_all(scorer, device, prompts, base_paths, tuned_paths, args.batch_size)
        summary[scorer.name] = summarize(*scores[scorer.name], args.bootstrap_samples, args.bootstrap_seed)
        free_memory(device)

    config = dict(
        vars(args),
        tuned_type=tuned.kind,
        pipeline_class=pipeline_class,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        num_prompts=len(prompts),
    )
    write_reports(args.output_dir, config, prompts, seeds, base_paths, tuned_paths, scores, summary)
    if summary:
        print(format_summary(summary))
    else:
        print("No scorer requested: only images and grid.png were written.")
    print(f"Results in {args.output_dir}: scores.json, scores.csv, grid.png, images/")


if __name__ == "__main__":
    main()
