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
"""InPO (Inversion Preference Optimization, CVPR 2025) for Stable Diffusion XL.

    accelerate launch train_inpo_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --dataset_name yuvalkirstain/pickapic_v2 --output_dir inpo-sdxl-lora

The same script as train_inpo.py, for SDXL: two text encoders, pooled text embeddings and size/crop
micro-conditioning ("time ids"). What it shares with train_inpo.py stands under `# Copied from train_inpo.<name>`
lines, kept identical by `python utils/check_copies.py` (`--fix` rewrites them); change those in train_inpo.py.
`inpo_utils.py` holds the method (DDIM inversion, the InPO loss) and the inversion cache format.
"""

import argparse
import copy
import datetime
import io
import json
import logging
import math
import os
import shutil
import time

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    send_to_device,
    set_seed,
)
from datasets.distributed import split_dataset_by_node
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import (
    check_min_version,
    convert_all_state_dict_to_peft,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_unet_state_dict_to_peft,
    make_image_grid,
)
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from diffusers.utils.import_utils import is_xformers_available
from diffusers.utils.torch_utils import is_compiled_module
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import inpo_utils


# The oldest diffusers these scripts run with (requirements.txt); as diffusers' own examples check theirs.
check_min_version("0.32.0")

logger = get_logger(__name__)

IS_SDXL = True
# The model family: recorded with checkpoints (so one family's cannot be resumed by another) and in the model card.
FAMILY, FAMILY_NAME, FAMILY_TAG = "sdxl", "Stable Diffusion XL", "stable-diffusion-xl"
# Copied from train_inpo.DEFAULT_VALIDATION_PROMPTS
DEFAULT_VALIDATION_PROMPTS = [
    "portrait photo of a girl, photograph, highly detailed face, depth of field, moody light, golden hour",
    "a cute dragon made of wool, studio lighting",
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dawn",
]
# Copied from train_inpo.PAIR_COLUMNS
PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
# Copied from train_inpo.CHECKPOINT_PREFIX
CHECKPOINT_PREFIX = "checkpoint-"
# Copied from train_inpo.LORA_WEIGHT_NAME
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Copied from train_inpo.KOHYA_LORA_WEIGHT_NAME
KOHYA_LORA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
# Copied from train_inpo.RUN_SETTINGS_FILE
RUN_SETTINGS_FILE = "inpo_run.json"
# Settings a checkpoint cannot be resumed across: they change what the saved weights are.
# Copied from train_inpo.STRUCTURAL_SETTINGS
STRUCTURAL_SETTINGS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "train_mode",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "dataset_name",
    "dataset_split_name",
    "max_train_samples",
    "resolution",
)


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.HelpFormatter
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script's usage example as written and shows every flag's default."""


# Copied from train_inpo.add_model_and_data_args
def add_model_and_data_args(parser, default_resolution):
    """Flags named as in diffusers' train_diffusion_dpo*.py where the meaning is the same."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    group.add_argument("--revision", default=None, help="Model revision on the hub.")
    group.add_argument("--variant", default=None, help="Weight variant, e.g. fp16.")
    group.add_argument(
        "--allow_unsafe_pickle_weights",
        action="store_true",
        help="Also load .bin/.ckpt (pickle) weights; by default only safetensors are loaded, since "
        "unpickling a file can run arbitrary code.",
    )
    group.add_argument(
        "--dataset_name",
        required=True,
        help="Hub id (yuvalkirstain/pickapic_v2) or local folder of <split>-*.parquet files with "
        "columns caption, jpg_0, jpg_1, label_0.",
    )
    group.add_argument("--dataset_split_name", default="train")
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep this many pairs (after ties).")
    group.add_argument("--resolution", type=int, default=default_resolution)
    group.add_argument("--random_crop", action="store_true", help="Random instead of centre crops.")
    group.add_argument("--no_hflip", action="store_true", help="Do not flip pairs horizontally at random.")
    group.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Fraction of captions replaced by '' (the InPO authors' script uses 0.2).",
    )
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset (datasets' streaming mode) instead of downloading it first, for "
        "datasets larger than the disk; needs --max_train_steps.",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: pairs held in memory to shuffle from (Pick-a-Pic: ~1 MB each).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Processes decoding images beside each training process (default: 2, so JPEG decoding overlaps the "
        "GPU's work; 0 with --streaming, which reads in the training process).",
    )
    group.add_argument("--vae_encode_batch_size", type=int, default=8, help="Images per VAE encode call.")


# Copied from train_inpo.add_inpo_args
def add_inpo_args(parser, default_beta):
    group = parser.add_argument_group("InPO")
    group.add_argument(
        "--beta_dpo",
        type=float,
        default=default_beta,
        help="β of the loss; it enters every --loss_type as ½·β times the error gap, the scale of diffusers' "
        "--beta_dpo in train_diffusion_dpo.py.",
    )
    group.add_argument(
        "--latent_source",
        choices=inpo_utils.LATENT_SOURCES,
        default="inverted_noise",
        help="inverted_noise: each image's own noise from one DDIM inversion by the frozen reference (its x0 "
        "component removed, standardised), mixed with fresh noise (--fresh_noise_mix) and forward-noised to a "
        "uniform t; cacheable. inversion: the paper's InPO, DDIM inversion by the policy up to t, implied noise as "
        "target. forward: Diffusion-DPO's forward noising with the same loss (the baseline).",
    )
    group.add_argument(
        "--inversion_steps",
        type=int,
        default=None,
        help="K: points of the DDIM inversion grid. Default: 5 for inverted_noise, 10 (the paper's) for inversion.",
    )
    group.add_argument(
        "--inversion_eta",
        type=float,
        default=None,
        help="With --latent_source inversion: std multiplier of the noise added after each inverse step "
        "(default 0.1, the authors'; 0 is pure DDIM inversion).",
    )
    group.add_argument(
        "--fresh_noise_mix",
        type=float,
        default=None,
        help="With --latent_source inverted_noise: λ in [0, 1]; the noise is √(1−λ)·inverted + √λ·fresh, the fresh "
        "noise shared by the pair as Diffusion-DPO's (default 0.9, chosen by the benchmark suite's worst case; 1 is "
        "Diffusion-DPO).",
    )
    group.add_argument(
        "--share_inverted_noise",
        action="store_true",
        help="With --latent_source inverted_noise: both images of a pair take one inverted noise, "
        "standardise((ε'_w + ε'_l)/√2), as Diffusion-DPO gives both its one fresh noise.",
    )
    group.add_argument(
        "--loss_type",
        choices=inpo_utils.LOSS_TYPES,
        default="sigmoid",
        help="sigmoid: the paper's −log σ(½·β·logits); hinge: max(0, 1 − ½·β·logits); ipo: (logits − 1/β)², "
        "with logits = reference error gap − policy error gap.",
    )
    group.add_argument(
        "--train_mode",
        choices=("lora", "full"),
        default="lora",
        help="lora: train LoRA adapters, reference = adapters off. full: train the whole UNet "
        "against a frozen copy (the paper).",
    )
    group.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    group.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    group.add_argument(
        "--lora_target_modules",
        default="to_k,to_q,to_v,to_out.0",
        help="Comma-separated UNet module names that get LoRA adapters.",
    )


# Copied from train_inpo.add_cache_args
def add_cache_args(parser):
    group = parser.add_argument_group("invert once: the inversion cache (--latent_source inverted_noise)")
    group.add_argument(
        "--inversion_cache_dir",
        default=None,
        help="Train from this precomputed cache: a step is then one policy forward and backward (no VAE, text "
        "encoder, inversion or reference forward); with --precompute_inversion_cache, write it.",
    )
    group.add_argument(
        "--precompute_inversion_cache",
        action="store_true",
        help="Invert the dataset once with the frozen reference, draw each pair's training timestep and fresh "
        "noise and compute the reference's errors there, write --inversion_cache_dir, then exit. Resumes an "
        "interrupted precompute.",
    )
    group.add_argument(
        "--cache_draws_per_pair",
        type=int,
        default=1,
        help="Training draws (t, fresh noise, reference errors) stored per pair, one per epoch; a run of more epochs "
        "reuses them in turn. Each costs one reference forward per image in the precompute, beside the inversion's K.",
    )
    group.add_argument("--cache_dtype", choices=tuple(inpo_utils.CACHE_DTYPES), default="fp16")
    group.add_argument("--cache_shard_size", type=int, default=256, help="Pairs per cache shard.")


# Copied from train_inpo.add_optimization_args
def add_optimization_args(parser, default_output_dir):
    group = parser.add_argument_group("optimisation")
    group.add_argument("--output_dir", default=default_output_dir)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--train_batch_size", type=int, default=1, help="Pairs per device per micro-batch.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=1e-5)
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the lr by batch size x accumulation x processes (as the authors do).",
    )
    group.add_argument(
        "--lr_scheduler",
        default="constant",
        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts scheduler."
    )
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    group.add_argument(
        "--use_adafactor",
        action="store_true",
        help="transformers' Adafactor at a fixed lr (the authors' SDXL optimizer) instead of AdamW.",
    )
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument(
        "--skip_nonfinite_steps",
        type=int,
        default=0,
        help="Optimizer steps with a non-finite loss (or, without fp16's loss scaling, a non-finite gradient) to "
        "skip before stopping (default: stop at the first). Under fp16 a gradient overflow is not counted here: the "
        "GradScaler skips that step and lowers its scale, as in every fp16 run.",
    )
    group.add_argument(
        "--nccl_timeout",
        type=int,
        default=1800,
        help="Seconds a process waits in a collective (barrier, all-reduce) for the others before the run fails, "
        "e.g. while the main process writes validation images or a checkpoint.",
    )
    group.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: accelerate's config."
    )
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (CUDA only); torch SDPA is the default.",
    )


# Copied from train_inpo.add_checkpoint_and_logging_args
def add_checkpoint_and_logging_args(parser):
    group = parser.add_argument_group("checkpoints, logging, hub")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    group.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    group.add_argument("--logging_dir", default="logs", help="Tracker folder inside --output_dir.")
    group.add_argument("--tracker_name", default="inpo")
    group.add_argument("--run_validation", action="store_true", help="Generate validation images.")
    group.add_argument("--validation_steps", type=int, default=200)
    group.add_argument("--validation_prompts", nargs="+", default=DEFAULT_VALIDATION_PROMPTS)
    group.add_argument(
        "--output_kohya_format",
        action="store_true",
        help=f"Also write the LoRA in the kohya / webui layout ({KOHYA_LORA_WEIGHT_NAME}).",
    )
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--hub_token", default=None)


# Copied from train_inpo.add_training_args
def add_training_args(parser, default_resolution, default_beta, default_output_dir):
    """The flags both scripts share, with the script's defaults."""
    add_model_and_data_args(parser, default_resolution)
    add_inpo_args(parser, default_beta)
    add_cache_args(parser)
    add_optimization_args(parser, default_output_dir)
    add_checkpoint_and_logging_args(parser)
    return parser


def add_sdxl_args(parser):
    """The flags of SDXL only."""
    group = parser.add_argument_group("SDXL")
    group.add_argument(
        "--fixed_time_ids",
        action="store_true",
        help="Condition every image on (res, res, 0, 0, res, res) as the InPO authors do, instead of "
        "its real original size and crop.",
    )
    vae_help = "A VAE that is stable in fp16 (madebyollin/sdxl-vae-fp16-fix). Without it the base VAE runs in fp32 "
    vae_help += "under fp16 training."
    group.add_argument("--pretrained_vae_model_name_or_path", default=None, help=vae_help)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(parser, default_resolution=1024, default_beta=5000.0, default_output_dir="inpo-sdxl-lora")
    add_sdxl_args(parser)
    args = parser.parse_args(argv)
    validate_args(args)
    return args


# Copied from train_inpo.validate_args
def validate_args(args):
    """Refuse impossible settings before anything is loaded, saying how to fix them."""
    problems = []
    if args.resolution % 8:
        problems.append(f"--resolution {args.resolution} is not a multiple of 8 (the VAE downsamples by 8).")
    if args.train_mode == "lora" and args.rank < 1:
        problems.append(f"--rank must be at least 1, got {args.rank}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.beta_dpo <= 0:
        problems.append(f"--beta_dpo must be positive, got {args.beta_dpo}.")
    if args.use_adafactor and args.use_8bit_adam:
        problems.append("--use_adafactor and --use_8bit_adam choose different optimizers: pass one of them.")
    if args.output_kohya_format and args.train_mode != "lora":
        problems.append("--output_kohya_format converts a LoRA: it needs --train_mode lora.")
    if args.inversion_steps is not None and not 1 <= args.inversion_steps <= 1000:
        problems.append(f"--inversion_steps must be in [1, 1000], got {args.inversion_steps}.")
    if args.inversion_eta is not None and args.inversion_eta < 0:
        problems.append(f"--inversion_eta must be >= 0, got {args.inversion_eta}.")
    if args.inversion_eta is not None and args.latent_source != "inversion":
        problems.append(
            "--inversion_eta is the noise of the paper's inversion up to t; it needs --latent_source inversion "
            "(inverted_noise inverts without noise, so that each image has one noise to cache)."
        )
    if args.fresh_noise_mix is not None and not 0 <= args.fresh_noise_mix <= 1:
        problems.append(f"--fresh_noise_mix must be in [0, 1], got {args.fresh_noise_mix}.")
    if args.fresh_noise_mix is not None and args.latent_source != "inverted_noise":
        problems.append("--fresh_noise_mix mixes into the inverted noise; it needs --latent_source inverted_noise.")
    if args.share_inverted_noise and args.latent_source != "inverted_noise":
        problems.append("--share_inverted_noise shares the inverted noise; it needs --latent_source inverted_noise.")
    if args.latent_source == "forward" and args.inversion_steps is not None:
        problems.append("--inversion_steps sets the inversion grid; --latent_source forward inverts nothing.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        problems.append("--proportion_empty_prompts must be in [0, 1].")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        problems.append("--train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        problems.append(
            "--hub_token with --report_to wandb would leak the token into the run config; "
            "log in with `huggingface-cli login` instead."
        )
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        candidate = os.path.join(args.output_dir, os.path.basename(args.resume_from_checkpoint))
        if not os.path.isdir(candidate):
            problems.append(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist (nor "
                f"{candidate!r}); pass a checkpoint-<step> folder or 'latest'."
            )
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            problems.append(
                "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
                "(CUDA only), or drop the flag to use torch SDPA."
            )
    if args.precompute_inversion_cache and args.inversion_cache_dir is None:
        problems.append("--precompute_inversion_cache needs --inversion_cache_dir (where to write the cache).")
    if args.inversion_cache_dir is not None and args.latent_source != "inverted_noise":
        problems.append(
            f"--inversion_cache_dir stores the frozen reference's inverted noise; --latent_source "
            f"{args.latent_source} cannot train from it ({'nothing to invert' if args.latent_source == 'forward' else 'the paper inverts with the policy being trained, which changes every step'}). "
            "Use --latent_source inverted_noise (the default), or train online."
        )
    if args.cache_draws_per_pair < 1:
        problems.append(f"--cache_draws_per_pair must be at least 1, got {args.cache_draws_per_pair}.")
    if args.cache_shard_size < 1:
        problems.append("--cache_shard_size must be at least 1.")
    if args.nccl_timeout < 1:
        problems.append(f"--nccl_timeout must be at least 1 second, got {args.nccl_timeout}.")
    if args.streaming:
        if args.max_train_steps is None:
            problems.append("--streaming needs --max_train_steps: a stream's length is unknown until it is read.")
        if args.max_train_samples is not None:
            problems.append("--max_train_samples does not apply to --streaming; bound the run with --max_train_steps.")
        if args.dataloader_num_workers:
            problems.append(
                "--streaming reads in the training process (workers would split the stream by file and "
                "lose the resume position); drop --dataloader_num_workers."
            )
        if args.inversion_cache_dir is not None:
            problems.append(
                "--streaming does not combine with the inversion cache: precompute from a downloaded "
                "dataset, then train from the cache (it is already local)."
            )
        if args.shuffle_buffer_size < 1:
            problems.append("--shuffle_buffer_size must be at least 1.")
    if problems:
        raise ValueError("Invalid arguments:\n  " + "\n  ".join(problems))
    # The two inverting methods have their own measured defaults (the paper's for the paper's InPO).
    if args.latent_source == "inversion":
        args.inversion_eta = 0.1 if args.inversion_eta is None else args.inversion_eta
    if args.latent_source == "inverted_noise":
        args.fresh_noise_mix = 0.9 if args.fresh_noise_mix is None else args.fresh_noise_mix
    if args.inversion_steps is None:
        args.inversion_steps = 5 if args.latent_source == "inverted_noise" else 10
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 0 if args.streaming else 2


# Copied from train_inpo.check_sharding
def check_sharding(args, accelerator):
    """Refuse what FSDP cannot run, before any weights load. (DeepSpeed ZeRO-2 shards only optimizer states and
    gradients, so every process still holds whole weights and everything else works as under DDP.)"""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    problems = []
    if args.train_mode == "lora":
        problems.append(
            "FSDP is for --train_mode full. LoRA adapters are small, and their reference is the same "
            "UNet with the adapters off, which FSDP's shards cannot be called as: use DDP "
            "(accelerate_configs/ddp_8gpu.yaml) or DeepSpeed ZeRO-2."
        )
    elif args.latent_source == "inversion":
        problems.append(
            "Under FSDP every process must make the same UNet calls, but the paper's InPO inverts with the "
            "policy once per grid point below each pair's t, which differs between processes: use DeepSpeed "
            "ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) or DDP."
        )
    if problems:
        raise ValueError("Not supported under FSDP:\n  " + "\n  ".join(problems))


def frozen_model_subfolders(args):
    """The pipeline subfolders `load_frozen_models` reads (the VAE from elsewhere with a separate fp16 VAE)."""
    subfolders = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"]
    if not args.pretrained_vae_model_name_or_path:
        subfolders.append("vae")
    return subfolders


# Copied from train_inpo.check_local_pipeline
def check_local_pipeline(args):
    """For a local model folder, name the subfolders it lacks before anything is loaded (hub ids are left to
    diffusers). Training from the inversion cache needs only the UNet (and the rest for validation images)."""
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path):
        return
    needed = ["unet", "scheduler"]
    if args.inversion_cache_dir is None or args.precompute_inversion_cache or args.run_validation:
        needed += frozen_model_subfolders(args)
    missing = [name for name in needed if not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise ValueError(
            f"{path!r} lacks the subfolder(s) {missing}: point --pretrained_model_name_or_path at a "
            "complete diffusers pipeline folder (as written by `pipeline.save_pretrained`)."
        )


# Copied from train_inpo.check_model_family
def check_model_family(pretrained_model_name_or_path, revision, cache_dir, want_sdxl):
    """Read the UNet and scheduler configs (no weights) and refuse the wrong family or a prediction type we
    can't train. Returns the scheduler config."""
    try:
        unet_config = UNet2DConditionModel.load_config(
            pretrained_model_name_or_path, subfolder="unet", revision=revision, cache_dir=cache_dir
        )
        scheduler_config = DDIMScheduler.load_config(
            pretrained_model_name_or_path, subfolder="scheduler", revision=revision, cache_dir=cache_dir
        )
    except OSError as error:
        raise ValueError(
            f"{pretrained_model_name_or_path!r} is not a diffusers pipeline with unet/ and scheduler/ "
            f"subfolders: {error}"
        ) from error
    is_sdxl = unet_config.get("addition_embed_type") == "text_time"
    if is_sdxl and not want_sdxl:
        raise ValueError(
            f"{pretrained_model_name_or_path!r} is an SDXL checkpoint (its UNet takes text_time "
            "conditioning): use train_inpo_sdxl.py."
        )
    if want_sdxl and not is_sdxl:
        raise ValueError(
            f"{pretrained_model_name_or_path!r} is not an SDXL checkpoint (its UNet has no text_time "
            "conditioning): use train_inpo.py for SD 1.x/2.x."
        )
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in inpo_utils.SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"The scheduler of {pretrained_model_name_or_path!r} predicts {prediction_type!r}; InPO "
            f"supports {inpo_utils.SUPPORTED_PREDICTION_TYPES}."
        )
    return DDIMScheduler.from_config(scheduler_config).config


# --------------------------------------------------------------------------------------------------------------
# Preference data (Pick-a-Pic v2 layout: caption, jpg_0, jpg_1, label_0)
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.find_problem
def find_problem(caption, image_bytes_0, image_bytes_1):
    """Why a row can't be trained on ("" if it can): unreadable image headers, zero-size images, empty captions.

    Only the image headers are parsed here (cheap); a body that fails to decode later is dropped in `collate_pairs`.
    """
    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    for name, data in (("jpg_0", image_bytes_0), ("jpg_1", image_bytes_1)):
        if not data:
            return f"{name} has no bytes"
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width == 0 or image.height == 0:
                    return f"{name} is zero-size"
        except (UnidentifiedImageError, OSError, ValueError) as error:
            return f"{name} does not decode ({type(error).__name__})"
    return ""


# Copied from train_inpo.check_pair_columns
def check_pair_columns(dataset_name, column_names):
    missing = [column for column in PAIR_COLUMNS if column not in column_names]
    if missing:
        raise ValueError(
            f"Dataset {dataset_name!r} lacks the column(s) {missing}; found {column_names}. "
            f"InPO needs Pick-a-Pic v2 columns {list(PAIR_COLUMNS)}: caption (str), jpg_0/jpg_1 "
            "(encoded image bytes), label_0 (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie)."
        )


# Copied from train_inpo.check_labels
def check_labels(labels):
    bad_labels = sorted({label for label in labels if label not in (0, 0.5, 1)}, key=str)
    if bad_labels:
        raise ValueError(f"label_0 must be 0, 0.5 or 1; found {bad_labels[:5]}.")


# Copied from train_inpo.load_split
def load_split(dataset_name, split, cache_dir, streaming=False):
    try:
        return datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir, streaming=streaming)
    except ValueError as error:
        raise ValueError(
            f"Could not load split {split!r} of {dataset_name!r}: {error}. Pass the split that holds "
            "your pairs with --dataset_split_name (local parquet folders: the file name prefix, "
            "e.g. train-*.parquet is split 'train')."
        ) from error


# Copied from train_inpo.load_preference_dataset
def load_preference_dataset(
    dataset_name, split, cache_dir=None, max_train_samples=None, seed=None, log=print, accelerator=None
):
    """Load a Pick-a-Pic-format dataset (hub id or local folder of parquet files), validate it, drop ties and
    unusable rows, and return it. Runs before any model is loaded, so a bad dataset fails in seconds.

    With an `accelerator`, every process loads the split (datasets' file locks let one download it while the others
    wait on the lock, not in a collective) and checks its share of the rows; the shares' findings are gathered, so
    no process waits in a barrier for a scan of the whole dataset.
    """
    dataset = load_split(dataset_name, split, cache_dir)
    check_pair_columns(dataset_name, dataset.column_names)
    dataset = dataset.select_columns(list(PAIR_COLUMNS))
    labels = dataset["label_0"]
    check_labels(labels)
    decided = [i for i, label in enumerate(labels) if label in (0, 1)]
    num_ties = len(labels) - len(decided)
    dataset = dataset.select(decided)
    if max_train_samples is not None:
        # Seeded even without --seed: every process must keep the same pairs.
        dataset = dataset.shuffle(seed=seed or 0).select(range(min(max_train_samples, len(dataset))))

    process_index, num_processes = (
        (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    )
    share = range(process_index, len(dataset), num_processes)
    share_problems = (
        []
        if len(share) == 0
        else dataset.select(share).map(
            lambda batch: {
                "problem": [find_problem(*row) for row in zip(batch["caption"], batch["jpg_0"], batch["jpg_1"])]
            },
            batched=True,
            remove_columns=dataset.column_names,
            desc="Checking pairs",
        )["problem"]
    )
    findings = list(zip(share, share_problems))
    if num_processes > 1:
        findings = gather_object(findings)
    problems = [problem for _, problem in sorted(findings)]
    skipped = [(i, problem) for i, problem in enumerate(problems) if problem]
    dataset = dataset.select([i for i, problem in enumerate(problems) if not problem])
    reasons = {}
    for _, problem in skipped:
        reasons[problem] = reasons.get(problem, 0) + 1
    log(
        f"Dataset {dataset_name!r} [{split}]: {len(dataset)} pairs kept, {num_ties} ties dropped, "
        f"{len(skipped)} rows skipped {reasons or ''}".rstrip()
    )
    if skipped:
        log("First skipped rows (index after dropping ties): " + ", ".join(f"{i}: {p}" for i, p in skipped[:5]))
    if len(dataset) == 0:
        raise ValueError(
            f"No usable preference pairs in {dataset_name!r} [{split}] ({num_ties} ties, "
            f"{len(skipped)} bad rows). Check label_0 and the image bytes."
        )
    return dataset


# Copied from train_inpo.resize_and_crop
def resize_and_crop(image, resolution, crop_fraction=(0.5, 0.5), flip=False):
    """Resize the short side to `resolution` (bilinear), crop a square, optionally flip; map to [−1, 1].

    crop_fraction (0.5, 0.5) is a centre crop; random crops pass uniform fractions. Returns
    (pixels (3, R, R) float32, original_size (h, w), crop_top_left (top, left)) — the last two are SDXL's
    micro-conditioning, measured in the resized image as diffusers' SDXL training scripts do.
    """
    image = image.convert("RGB")
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.BILINEAR)
    top = round((image.height - resolution) * crop_fraction[0])
    left = round((image.width - resolution) * crop_fraction[1])
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, original_size, (top, left)


# Copied from train_inpo.transform_pair
def transform_pair(row, index, resolution, rng, random_crop, hflip):
    """A decided Pick-a-Pic row → the example `collate_pairs` batches (preferred image first), or None when an
    image body does not decode. Both images share the crop fractions and the flip drawn from `rng`."""
    crop_fraction = tuple(rng.uniform(size=2)) if random_crop else (0.5, 0.5)
    flip = hflip and bool(rng.integers(2))
    preferred, rejected = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")
    try:
        images = [Image.open(io.BytesIO(row[name])) for name in (preferred, rejected)]
        transformed = [resize_and_crop(image, resolution, crop_fraction, flip) for image in images]
    except (OSError, ValueError) as error:
        logging.getLogger(__name__).warning(f"Skipping pair {index}: image does not decode ({error}).")
        return None
    return {
        "index": index,
        "caption": row["caption"],
        "pixel_values": torch.stack([t[0] for t in transformed]),
        "original_sizes": torch.tensor([t[1] for t in transformed]),
        "crop_top_lefts": torch.tensor([t[2] for t in transformed]),
    }


# Copied from train_inpo.PreferencePairs
class PreferencePairs(torch.utils.data.Dataset):
    """Decoded, transformed pairs with the preferred image first.

    Each index draws its crop and flip from its own generator seeded by (seed, epoch, index), so a resumed run sees
    the same augmentation as an uninterrupted one; both images of a pair share the flip and crop fractions.
    """

    def __init__(self, dataset, resolution, random_crop=False, hflip=True, seed=0):
        self.dataset = dataset
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = seed or 0
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def decoded(self, index):
        """Pair `index` transformed, or None when an image body does not decode."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return transform_pair(self.dataset[index], index, self.resolution, rng, self.random_crop, self.hflip)

    def __getitem__(self, index):
        # A pair whose image body fails to decode (its header passed `find_problem`) is replaced by the next one that
        # decodes: every process must bring a batch to every step, or the others wait for it in a collective.
        for offset in range(len(self)):
            example = self.decoded((index + offset) % len(self))
            if example is not None:
                if offset:
                    logging.getLogger(__name__).warning(f"Training on pair {example['index']} in place of {index}.")
                return example
        raise ValueError("No pair of the dataset decodes; check the image bytes.")


# Copied from train_inpo.load_preference_stream
def load_preference_stream(dataset_name, split, cache_dir, shuffle_buffer_size, seed, process_index, num_processes):
    """This process's share of a streamed Pick-a-Pic-format dataset, shuffled through a buffer (--streaming).

    Nothing is downloaded up front; the columns and the first row are checked now so a wrong dataset fails in
    seconds. `datasets.distributed.split_dataset_by_node` gives each process whole parquet shards when their
    number divides evenly, otherwise every num_processes-th row; the shuffle (seeded, reshuffled by `set_epoch`)
    is identical on every process, so the shares partition each epoch.
    """
    stream = load_split(dataset_name, split, cache_dir, streaming=True)
    first = next(iter(stream), None)
    if first is None:
        raise ValueError(f"Split {split!r} of {dataset_name!r} is empty.")
    check_pair_columns(dataset_name, stream.column_names or list(first))
    stream = stream.select_columns(list(PAIR_COLUMNS)).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return split_dataset_by_node(stream, rank=process_index, world_size=num_processes)


# Copied from train_inpo.StreamingPairs
class StreamingPairs(torch.utils.data.IterableDataset):
    """Transformed pairs from this process's share of a stream, epoch after epoch without end: a streaming run is
    measured in --max_train_steps, and no process may run dry before the others (shares differ in size).

    Ties and unusable rows are dropped and counted as in the map-style path (`find_problem`, then decoding); each
    epoch ends with a log line of the counts. The position (epoch, rows read) of every process goes into
    checkpoints; a resumed run replays its share of the epoch up to that row without decoding the images, so it
    trains on the same pairs in the same order as an uninterrupted run.
    """

    def __init__(self, stream, resolution, random_crop, hflip, seed, accelerator):
        self.stream = stream
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = seed
        self.accelerator = accelerator
        self.epoch, self.rows_read = 0, 0

    def __iter__(self):
        logger = logging.getLogger(__name__)  # every process logs its own share's counts
        while True:
            self.stream.set_epoch(self.epoch)
            rows = iter(self.stream)
            resumed_at = self.rows_read
            for _ in range(resumed_at):  # resume: rows already trained on in this epoch
                next(rows)
            kept, dropped = 0, {}
            for row in rows:
                index = self.rows_read
                self.rows_read += 1
                check_labels([row["label_0"]])
                problem = "tie" if row["label_0"] == 0.5 else find_problem(row["caption"], row["jpg_0"], row["jpg_1"])
                if not problem:
                    rng = np.random.default_rng((self.seed, self.epoch, self.accelerator.process_index, index))
                    example = transform_pair(row, index, self.resolution, rng, self.random_crop, self.hflip)
                    problem = "image does not decode" if example is None else ""
                if problem:
                    dropped[problem] = dropped.get(problem, 0) + 1
                    continue
                kept += 1
                yield example
            ties = dropped.pop("tie", 0)
            logger.info(
                f"Streamed epoch {self.epoch} on process {self.accelerator.process_index} (from row "
                f"{resumed_at}): {kept} pairs, {ties} ties dropped, {sum(dropped.values())} rows skipped "
                f"{dropped or ''}".rstrip()
            )
            if kept == 0 and resumed_at == 0:
                raise ValueError(
                    f"Process {self.accelerator.process_index}'s share of the stream holds no usable "
                    "pairs; check label_0 and the image bytes, or use fewer processes."
                )
            self.epoch, self.rows_read = self.epoch + 1, 0

    def state_dict(self):
        # Called on every process by save_state; only the main process writes, so it must hold all positions.
        position = torch.tensor([[self.epoch, self.rows_read]], device=self.accelerator.device)
        return {"positions": self.accelerator.gather(position).cpu()}

    def load_state_dict(self, state):
        positions = state["positions"]
        if len(positions) == self.accelerator.num_processes:
            self.epoch, self.rows_read = positions[self.accelerator.process_index].tolist()
            return
        # Another process count splits the stream differently: the saved positions mean nothing in the new shares.
        self.epoch, self.rows_read = int(positions[:, 0].min()), 0
        logger.warning(
            f"The checkpoint was written by {len(positions)} processes, this run has "
            f"{self.accelerator.num_processes}: the stream's shares differ, so its position within the epoch cannot "
            f"be restored. Restarting streamed epoch {self.epoch} from its beginning (pairs already trained on in "
            "it are seen again). Resume with the same number of processes to continue exactly."
        )


# Copied from train_inpo.collate_pairs
def collate_pairs(examples):
    """Batch B pairs as 2B rows, winners first."""

    def winners_then_losers(key):
        stacked = torch.stack([example[key] for example in examples])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])

    return {
        "indices": torch.tensor([example["index"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "pixel_values": winners_then_losers("pixel_values").contiguous(),
        "original_sizes": winners_then_losers("original_sizes"),
        "crop_top_lefts": winners_then_losers("crop_top_lefts"),
    }


# Copied from train_inpo.make_dataloader
def make_dataloader(pairs, collate_fn, args):
    """Shuffled batches of pairs; `accelerator.prepare` then gives each process its own share of every epoch.
    A stream (StreamingPairs) shuffles and splits itself. Pinned memory makes the copies to a GPU asynchronous;
    workers are not persistent, so each epoch's workers see the epoch its augmentation is drawn for (`set_epoch`)."""
    streaming = isinstance(pairs, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        pairs,
        batch_size=args.train_batch_size,
        shuffle=not streaming,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )


# Copied from train_inpo.load_training_data
def load_training_data(args, accelerator, scheduler_config):
    """(pairs, collate_fn, dataset): the downloaded pairs, a stream, or the inversion cache. `dataset` is the
    checked Pick-a-Pic split (None when streaming or reading the cache); the precompute inverts it."""
    seed = 0 if args.seed is None else args.seed
    if args.inversion_cache_dir is not None and not args.precompute_inversion_cache:
        fingerprint = inpo_utils.cache_fingerprint(args, scheduler_config, IS_SDXL)
        manifest = inpo_utils.read_cache_manifest(args.inversion_cache_dir, fingerprint)
        pairs = inpo_utils.CachedPairs(args.inversion_cache_dir, manifest)
        logger.info(
            f"Training from the inversion cache {args.inversion_cache_dir}: {len(pairs)} pairs, "
            f"{pairs.draws_per_pair} draw(s) each; a step is one policy forward and backward."
        )
        return pairs, inpo_utils.collate_cached, None
    if args.streaming:
        stream = load_preference_stream(
            args.dataset_name,
            args.dataset_split_name,
            args.cache_dir,
            args.shuffle_buffer_size,
            seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
        pairs = StreamingPairs(stream, args.resolution, args.random_crop, not args.no_hflip, seed, accelerator)
        return pairs, collate_pairs, None
    dataset = load_preference_dataset(
        args.dataset_name,
        args.dataset_split_name,
        args.cache_dir,
        args.max_train_samples,
        args.seed,
        log=logger.info,
        accelerator=accelerator,
    )
    pairs = PreferencePairs(dataset, args.resolution, args.random_crop, not args.no_hflip, seed)
    return pairs, collate_pairs, dataset


# --------------------------------------------------------------------------------------------------------------
# Models: frozen encoders, the policy (LoRA or full) and its reference, optimizer, checkpoint hooks
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.make_accelerator
def make_accelerator(args):
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Epoch shuffles from (seed, epoch), so a resumed run reads pairs in the uninterrupted order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.nccl_timeout))],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        # Same on every process: LoRA initialisation and anything else drawn before the per-process generator.
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


# Copied from train_inpo.weight_dtype_of
def weight_dtype_of(accelerator):
    """dtype for frozen weights: fp16/bf16 under mixed precision; trainable parameters stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# Copied from train_inpo.weight_loading_kwargs
def weight_loading_kwargs(args):
    """from_pretrained kwargs for weights: safetensors only unless --allow_unsafe_pickle_weights."""
    return {
        "revision": args.revision,
        "variant": args.variant,
        "cache_dir": args.cache_dir,
        "use_safetensors": None if args.allow_unsafe_pickle_weights else True,
    }


def load_vae(args, accelerator):
    """The VAE, frozen: --pretrained_vae_model_name_or_path if given, else the base model's. The original SDXL VAE
    overflows in fp16, so under fp16 it stays in fp32; only a VAE made for it (the fp16-fix) runs in half."""
    weights = weight_loading_kwargs(args)
    if args.pretrained_vae_model_name_or_path:
        vae_weights = dict(weights, revision=None, variant=None)
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **vae_weights)
    else:
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **weights)
    weight_dtype = weight_dtype_of(accelerator)
    fp16_base_vae = weight_dtype == torch.float16 and not args.pretrained_vae_model_name_or_path
    vae_dtype = torch.float32 if fp16_base_vae else weight_dtype
    return vae.requires_grad_(False).to(accelerator.device, dtype=vae_dtype).eval()


def load_frozen_models(args, accelerator):
    """Both tokenizers and text encoders and the VAE, frozen, keyed by their pipeline names."""
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = weight_loading_kwargs(args)
    path = args.pretrained_model_name_or_path
    frozen = {
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights),
        "vae": load_vae(args, accelerator),
    }
    weight_dtype = weight_dtype_of(accelerator)
    for encoder in (frozen["text_encoder"], frozen["text_encoder_2"]):
        encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    return frozen


# Copied from train_inpo.load_unet
def load_unet(args):
    return UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", **weight_loading_kwargs(args)
    )


def make_pipeline(args, accelerator, **components):
    """The base SDXL pipeline with `components` (e.g. the trained UNet) swapped in, for validation and saving.
    Without a VAE among them (training from the cache) the run's VAE is loaded as for training (`load_vae`)."""
    if "vae" not in components:
        components["vae"] = load_vae(args, accelerator)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        torch_dtype=weight_dtype_of(accelerator),
        **weight_loading_kwargs(args),
        **components,
    )
    return pipeline.to(accelerator.device)


# Copied from train_inpo.setup_policy_and_reference
def setup_policy_and_reference(unet, args, accelerator, with_reference=True):
    """Make `unet` the trainable policy and return (unet, reference, trainable_params).

    LoRA: base weights frozen in the mixed-precision dtype, adapters in fp32; the reference is the same UNet with
    the adapters disabled. Full: the whole UNet trains in fp32 against a frozen copy in the mixed-precision dtype
    (not made when `with_reference` is False: training from the cache needs none).
    """
    weight_dtype = weight_dtype_of(accelerator)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.train_mode == "lora":
        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.lora_alpha or args.rank,
                init_lora_weights="gaussian",
                target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
            )
        )
        cast_training_params(unet, dtype=torch.float32)
        reference = inpo_utils.AdaptersDisabled(unet)
    else:
        reference = None
        if with_reference:
            reference = copy.deepcopy(unet).requires_grad_(False)
            reference.to(accelerator.device, dtype=weight_dtype).eval()
        unet.requires_grad_(True)
        unet.to(accelerator.device, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"No UNet module matched --lora_target_modules {args.lora_target_modules!r}.")
    return unet, reference, trainable


# Copied from train_inpo.make_optimizer
def make_optimizer(params, args):
    if args.use_adafactor:
        # As the authors' SDXL runs: an external lr (no relative steps, no parameter scaling), update clipping 1.
        return transformers.Adafactor(
            params,
            lr=args.learning_rate,
            weight_decay=args.adam_weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


# Copied from train_inpo.resolve_max_train_steps
def resolve_max_train_steps(args, num_batches_per_epoch):
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(
            num_batches_per_epoch / args.gradient_accumulation_steps
        )
    return args.max_train_steps


# Copied from train_inpo.make_lr_scheduler
def make_lr_scheduler(optimizer, args, num_processes):
    # The prepared scheduler steps once per process per optimizer step.
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


# Copied from train_inpo.lora_scale
def lora_scale(unet):
    """alpha / rank of the UNet's LoRA adapter: the factor peft applies to its up projections."""
    config = unet.peft_config["default"]
    return config.lora_alpha / config.r


# Copied from train_inpo.lora_layers
def lora_layers(unet):
    """The UNet's LoRA weights in diffusers' format (what `save_lora_weights` writes), with alpha / rank folded
    into the up projections: diffusers (every version) and kohya tools read a LoRA file without adapter metadata
    at alpha = rank, so the file loads at the strength it was trained with."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    scale = lora_scale(unet)
    return {name: weight * scale if ".lora.up." in name else weight for name, weight in layers.items()}


# Copied from train_inpo.register_checkpoint_hooks with StableDiffusionPipeline->StableDiffusionXLPipeline
def register_checkpoint_hooks(accelerator, args):
    """Make `save_state` write the LoRA in diffusers' format (or the full UNet) instead of a pickled state dict,
    and `load_state` read it back, keeping trainable parameters in fp32."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return  # accelerate saves and restores FSDP's shards itself; the unwrapped module holds only one shard

    def save_hook(models, weights, output_dir):
        for model in models:
            model = accelerator.unwrap_model(model)
            if accelerator.is_main_process and args.train_mode == "lora":
                StableDiffusionXLPipeline.save_lora_weights(output_dir, unet_lora_layers=lora_layers(model))
            elif accelerator.is_main_process:
                model.save_pretrained(os.path.join(output_dir, "unet"))
            if weights:  # saved above in diffusers' format; keep accelerate from pickling it again
                weights.pop()

    def load_hook(models, input_dir):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            return  # the engine restores its weights (and fp32 master copies) from its own checkpoint
        while models:
            model = accelerator.unwrap_model(models.pop())
            if args.train_mode == "lora":
                state_dict, _ = StableDiffusionXLPipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
                unet_state = {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
                peft_state = convert_unet_state_dict_to_peft(unet_state)
                scale = lora_scale(model)  # saved with alpha / rank folded in (`lora_layers`)
                peft_state = {k: v / scale if ".lora_B." in k else v for k, v in peft_state.items()}
                incompatible = set_peft_model_state_dict(model, peft_state, adapter_name="default")
                if incompatible is not None and incompatible.unexpected_keys:
                    raise ValueError(
                        f"Checkpoint {input_dir} has LoRA weights this model lacks: "
                        f"{incompatible.unexpected_keys[:3]} (different --rank/--lora_target_modules?)"
                    )
                cast_training_params(model, dtype=torch.float32)
            else:
                saved = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(saved.state_dict())
                del saved

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# Copied from train_inpo.StepRandomness
class StepRandomness:
    """The generator behind timesteps, VAE sampling and inversion noise: one stream per process (seed + rank),
    saved in checkpoints so a resumed run draws the same numbers as an uninterrupted one (the global RNGs are also
    touched by data loading, so they can't serve)."""

    def __init__(self, seed, accelerator):
        self.accelerator = accelerator
        self.generator = torch.Generator(device=accelerator.device)
        self.generator.manual_seed(seed + accelerator.process_index)

    def state_dict(self):
        # Called on every process by save_state; only the main process writes, so it must hold all streams.
        state = self.generator.get_state().to(self.accelerator.device)
        return {"states": self.accelerator.gather(state[None]).cpu()}

    def load_state_dict(self, state):
        states = state["states"]
        if self.accelerator.process_index < len(states):  # a process the checkpoint lacks keeps its fresh seed
            # clone: set_state on a row view (non-zero storage offset) crashes torch 2.13 with a segfault
            self.generator.set_state(
                states[self.accelerator.process_index].clone().to(self.generator.get_state().device)
            )


# --------------------------------------------------------------------------------------------------------------
# The loss of one step: images → latents, captions → conditioning, then inpo_utils
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.drop_captions
def drop_captions(captions, proportion, generator):
    """Replace a `proportion` of captions by '' (unconditional training signal)."""
    # Drawn even when nothing is dropped, so the step's later draws do not depend on the proportion.
    drop = torch.rand(len(captions), generator=generator, device=generator.device)
    if proportion == 0:
        return list(captions)
    return ["" if dropped else caption for caption, dropped in zip(captions, (drop < proportion).tolist())]


# Copied from train_inpo.encode_images
@torch.no_grad()
def encode_images(pixel_values, vae, batch_size, generator):
    """(2B, 3, R, R) in [−1, 1] → (2B, 4, R/8, R/8) scaled latents, in chunks to bound VAE memory."""
    chunks = pixel_values.to(vae.device, vae.dtype).split(batch_size)
    latents = [vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in chunks]
    return torch.cat(latents).float() * vae.config.scaling_factor


def sdxl_time_ids(original_sizes, crop_top_lefts, resolution):
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Args: original_sizes, crop_top_lefts (N, 2) long, as `resize_and_crop` reports them.
    Returns: (N, 6) float.
    """
    target = torch.tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()


@torch.no_grad()
def encode_prompt(batch, frozen, args, generator):
    """Penultimate hidden states of both text encoders, the pooled embedding and the time ids.

    Returns (encoder_hidden_states (2B, L, D1 + D2), added_cond_kwargs {"text_embeds", "time_ids"}): both images
    of a pair share the caption; each image has its own size and crop.
    """
    captions = drop_captions(batch["captions"], args.proportion_empty_prompts, generator)
    hidden_states = []
    for tokenizer, encoder in (
        (frozen["tokenizer"], frozen["text_encoder"]),
        (frozen["tokenizer_2"], frozen["text_encoder_2"]),
    ):
        ids = tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    pooled = output[0]  # text_embeds of the projection encoder, as SDXL pipelines use it
    if args.fixed_time_ids:
        resolution = args.resolution
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2 * len(captions))
    else:
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], args.resolution)
    added_cond_kwargs = {
        "text_embeds": pooled.repeat(2, 1),
        "time_ids": time_ids.to(pooled.device, pooled.dtype),
    }
    return torch.cat(hidden_states, dim=-1).repeat(2, 1, 1), added_cond_kwargs


# Copied from train_inpo.make_inverse_scheduler
def make_inverse_scheduler(scheduler_config, args, device):
    """The DDIM inverse scheduler on the model's noise schedule with the --inversion_steps grid."""
    return inpo_utils.make_inverse_scheduler(scheduler_config, args.inversion_steps, device)


# Copied from train_inpo.policy_input_dtype
def policy_input_dtype(accelerator):
    """The dtype of the policy's trainable weights, which its inputs take: float32 under accelerate's mixed
    precision (`setup_policy_and_reference` keeps them so; autocast casts down), the mixed-precision dtype under
    DeepSpeed, which casts the whole module to it and runs no autocast."""
    return weight_dtype_of(accelerator) if accelerator.distributed_type == DistributedType.DEEPSPEED else torch.float32


# Copied from train_inpo.compute_loss
def compute_loss(
    x0, encoder_hidden_states, added_cond_kwargs, unet, reference, inverse_scheduler, args, accelerator, generator
):
    """Online InPO on one micro-batch of latents and conditioning: `inpo_utils.inpo_step_loss`, inverting with the
    frozen reference (inverted_noise) or with the policy as it is now (inversion, the paper's)."""
    inversion_unet = accelerator.unwrap_model(unet) if args.latent_source == "inversion" else reference
    with accelerator.autocast():
        return inpo_utils.inpo_step_loss(
            unet,
            reference,
            inversion_unet,
            x0,
            encoder_hidden_states,
            inverse_scheduler,
            args.beta_dpo,
            latent_source=args.latent_source,
            eta=args.inversion_eta or 0.0,
            added_cond_kwargs=added_cond_kwargs,
            generator=generator,
            loss_type=args.loss_type,
            fresh_noise_mix=args.fresh_noise_mix or 0.0,
            share_inverted_noise=args.share_inverted_noise,
            policy_dtype=policy_input_dtype(accelerator),
        )


# Copied from train_inpo.compute_cached_loss
def compute_cached_loss(batch, unet, inverse_scheduler, args, accelerator):
    """InPO from the inversion cache: the policy's forward on x0 noised with the stored noise and fresh noise at
    the stored t, against the stored reference errors (`inpo_utils.cached_step_loss`)."""
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    added = {k: v.to(device, weight_dtype) for k, v in (batch["added_cond_kwargs"] or {}).items()} or None
    fresh = batch["fresh_noise"]
    with accelerator.autocast():
        return inpo_utils.cached_step_loss(
            unet,
            batch["x0"].to(device, torch.float32),
            batch["noise"].to(device, torch.float32),
            batch["timesteps"].to(device),
            batch["encoder_hidden_states"].to(device, weight_dtype),
            batch["reference_errors"].to(device),
            inverse_scheduler.alphas_cumprod,
            inverse_scheduler.config.prediction_type,
            args.beta_dpo,
            added,
            loss_type=args.loss_type,
            fresh_noise_mix=args.fresh_noise_mix,
            fresh_noise=None if fresh is None else fresh.to(device, torch.float32),
            policy_dtype=policy_input_dtype(accelerator),
        )


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.run_settings
def run_settings(args):
    settings = {name: getattr(args, name) for name in STRUCTURAL_SETTINGS}
    settings["family"] = FAMILY
    return settings


# Copied from train_inpo.check_output_dir
def check_output_dir(args):
    """Refuse an --output_dir that holds checkpoints of a different run, or of an earlier run when not resuming,
    instead of mixing their checkpoints with this run's."""
    checkpoints = list_checkpoints(args.output_dir)
    if not checkpoints:
        return
    settings_path = os.path.join(args.output_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            differences = inpo_utils.fingerprint_differences(json.load(f), run_settings(args))
        if differences:
            raise ValueError(
                f"--output_dir {args.output_dir!r} holds checkpoints of a run with other settings; use a "
                "new --output_dir:\n  " + "\n  ".join(d.replace("cache has", "that run has") for d in differences)
            )
    if args.resume_from_checkpoint is None:
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds {checkpoints[-1]} from an earlier run: pass "
            "--resume_from_checkpoint latest to continue it, or choose another --output_dir."
        )


# Copied from train_inpo.write_run_settings
def write_run_settings(args):
    with open(os.path.join(args.output_dir, RUN_SETTINGS_FILE), "w") as f:
        json.dump(run_settings(args), f, indent=1)


# Copied from train_inpo.list_checkpoints
def list_checkpoints(output_dir):
    """checkpoint-<step> folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        n for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(names, key=lambda name: int(name[len(CHECKPOINT_PREFIX) :]))


# Copied from train_inpo.resolve_resume_checkpoint
def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """Path of the checkpoint to resume from, or None for "latest" with nothing saved yet."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return os.path.join(output_dir, checkpoints[-1]) if checkpoints else None
    if os.path.isdir(resume_from_checkpoint):
        return resume_from_checkpoint
    return os.path.join(output_dir, os.path.basename(resume_from_checkpoint))


# Copied from train_inpo.prune_checkpoints
def prune_checkpoints(output_dir, total_limit, about_to_save=1):
    """Delete the oldest checkpoints so that at most `total_limit` remain after saving `about_to_save` more."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) + about_to_save - total_limit
    removed = checkpoints[: max(excess, 0)]
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name))
    return removed


# Copied from train_inpo.save_checkpoint
def save_checkpoint(accelerator, args, global_step):
    """`accelerator.save_state` into a temporary folder, then an atomic rename: a run killed mid-save never
    leaves a half-written checkpoint for `latest` to pick."""
    final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    partial = os.path.join(args.output_dir, f".partial-{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process:
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


# Copied from train_inpo.resume_position
def resume_position(args, accelerator, streaming, updates_per_epoch):
    """(global_step, first_epoch, batches_to_skip) after loading --resume_from_checkpoint, if any."""
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        if args.resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")
        return 0, 0, 0
    accelerator.print(f"Resuming from {checkpoint}")
    accelerator.load_state(checkpoint)
    global_step = int(os.path.basename(checkpoint)[len(CHECKPOINT_PREFIX) :])
    if streaming:  # a stream restores its position from the checkpoint itself
        return global_step, 0, 0
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    return global_step, global_step // updates_per_epoch, batches_to_skip


# --------------------------------------------------------------------------------------------------------------
# Logging, validation, saving, model card
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.accumulate_metrics
def accumulate_metrics(accumulated, metrics, gradient_accumulation_steps):
    """Add a micro-batch's scalar metric tensors into `accumulated` (on the device: no host sync per micro-batch)."""
    for name, value in metrics.items():
        accumulated[name] = accumulated.get(name, 0.0) + value.detach().float() / gradient_accumulation_steps
    return accumulated


# Copied from train_inpo.gather_mean
def gather_mean(accelerator, metrics):
    """Average a dict of scalar tensors over processes; returns floats (one gather, one host sync)."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[name] for name in names])
    gathered = accelerator.gather(stacked[None]).mean(dim=0)
    return dict(zip(names, gathered.tolist()))


# Copied from train_inpo.uses_loss_scaling
def uses_loss_scaling(accelerator):
    """fp16 training with a loss scaler, which skips the steps whose gradients overflow: accelerate's GradScaler,
    or DeepSpeed's own (which steps inside `backward`)."""
    deepspeed_fp16 = (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "fp16"
    )
    return accelerator.scaler is not None or deepspeed_fp16


# Copied from train_inpo.all_finite
def all_finite(accelerator, value):
    """True when `value` is finite on every process."""
    flag = torch.isfinite(value).all().float().reshape(1)
    return bool(accelerator.gather(flag).min() > 0)


# Copied from train_inpo.MAX_CONSECUTIVE_OVERFLOW_STEPS
MAX_CONSECUTIVE_OVERFLOW_STEPS = 30


# Copied from train_inpo.check_overflow_steps
def check_overflow_steps(consecutive_overflow_steps, global_step, accelerator):
    """Stop when the loss scaler has skipped too many optimizer steps in a row; single overflows are routine."""
    if consecutive_overflow_steps < MAX_CONSECUTIVE_OVERFLOW_STEPS:
        return
    scale = f" (loss scale now {accelerator.scaler.get_scale():.3g})" if accelerator.scaler is not None else ""
    raise FloatingPointError(
        f"The fp16 loss scaler skipped the last {consecutive_overflow_steps} optimizer steps, up to step "
        f"{global_step}, for overflowing gradients{scale}: the gradients are non-finite at any scale. Lower "
        "--learning_rate or --beta_dpo, or train in bf16 (--mixed_precision bf16)."
    )


# Copied from train_inpo.check_nonfinite_step
def check_nonfinite_step(args, accumulated, global_step, nonfinite_steps):
    """Stop at a non-finite optimizer step beyond --skip_nonfinite_steps; warn about one that was skipped."""
    if nonfinite_steps > args.skip_nonfinite_steps:
        last = list_checkpoints(args.output_dir)
        raise FloatingPointError(
            f"Non-finite loss or gradient at optimizer step {global_step + 1} (mean timestep "
            f"{accumulated.get('timestep', float('nan')):.0f}; metrics "
            f"{ {k: round(v, 6) for k, v in accumulated.items()} }). Stopped without saving; the last "
            f"good checkpoint is {last[-1] if last else 'none'}. Lower --learning_rate or --beta_dpo, "
            "prefer bf16 to fp16, or pass --skip_nonfinite_steps N to skip up to N such steps."
        )
    logger.warning(
        f"Skipped optimizer step {global_step + 1}: non-finite loss or gradient "
        f"({nonfinite_steps}/{args.skip_nonfinite_steps} allowed)."
    )


# Copied from train_inpo.check_replicas_in_sync
def check_replicas_in_sync(accelerator, params):
    """Raise if the trained weights differ between processes (a broken data-parallel set-up); log when they agree."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=0):
        raise RuntimeError(f"Trained weights differ between processes (checksums {sums.tolist()}).")
    logger.info(
        f"Trained weights identical on all {accelerator.num_processes} processes (checksum {sums[0].item():.9g})."
    )


# Copied from train_inpo.unwrapped_policy
def unwrapped_policy(accelerator, unet):
    policy = accelerator.unwrap_model(unet)
    return policy._orig_mod if is_compiled_module(policy) else policy


# Copied from train_inpo.exportable_policy
def exportable_policy(accelerator, unet):
    """The policy with whole weights on the main process (None elsewhere). Call on every process: under FSDP
    it gathers the shards into a fresh UNet."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return unwrapped_policy(accelerator, unet) if accelerator.is_main_process else None
    weights = accelerator.get_state_dict(unet)
    if not accelerator.is_main_process:
        return None
    policy = UNet2DConditionModel.from_config(unwrapped_policy(accelerator, unet).config)
    policy.load_state_dict(weights)
    return policy.to(accelerator.device)


# Copied from train_inpo.decode_latents
@torch.no_grad()
def decode_latents(pipeline, latents):
    """Latents → PIL images through the pipeline's VAE in its own dtype. Called outside autocast, which would run
    a VAE kept in fp32 (SDXL's base VAE overflows in fp16: black images) in fp16 all the same."""
    vae = pipeline.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


# Copied from train_inpo.log_validation_images
def log_validation_images(accelerator, pipeline, prompts, seed, resolution, step, tag="validation"):
    """Generate one image per prompt with a fixed seed, log them to the trackers, return them (PIL)."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        # Prompt i gets seed + i, as in evaluate_inpo.py, so an image does not depend on the prompts before it.
        generator = torch.Generator(device=accelerator.device).manual_seed((seed or 0) + i)
        # Autocast for the denoising only: mid-run the UNet mixes fp32 trainable weights with half-precision ones.
        with accelerator.autocast():
            latents = pipeline(
                prompt,
                num_inference_steps=25,
                height=resolution,
                width=resolution,
                generator=generator,
                output_type="latent",
            ).images
        images += decode_latents(pipeline, latents)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=p) for image, p in zip(images, prompts)]}, step=step)
    return images


# Copied from train_inpo.run_validation
def run_validation(args, accelerator, unet, frozen, global_step):
    """Validation images from the policy as it is now (called on every process)."""
    policy = exportable_policy(accelerator, unet)
    if accelerator.is_main_process:
        pipeline = make_pipeline(args, accelerator, unet=policy, **frozen)
        log_validation_images(accelerator, pipeline, args.validation_prompts, args.seed, args.resolution, global_step)
        unet.train()


# Copied from train_inpo.write_model_card
def write_model_card(args, output_dir, images=None):
    """README.md for the output folder: base model, data, InPO settings; the validation grid if there is one."""
    if images:
        make_image_grid(images, 1, len(images)).save(os.path.join(output_dir, "validation_grid.png"))
    kind = "LoRA adapters" if args.train_mode == "lora" else "a fully fine-tuned UNet"
    description = f"""
# InPO {kind} for {args.pretrained_model_name_or_path} ({FAMILY_NAME})

Aligned with InPO (Inversion Preference Optimization, CVPR 2025) on `{args.dataset_name}`
(split `{args.dataset_split_name}`{f", {args.max_train_samples} pairs" if args.max_train_samples else ""}).

| setting | value |
|---|---|
| β (beta_dpo) | {args.beta_dpo} |
| loss | {args.loss_type} |
| optimizer steps | {args.max_train_steps} |
| pairs per step | {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x processes |
| learning rate | {args.learning_rate} ({args.lr_scheduler}) |
| latent source | {args.latent_source}{"" if args.latent_source == "forward" else f" ({args.inversion_steps} inversion steps)"}{f", fresh noise mix {args.fresh_noise_mix}{', shared within pairs' if args.share_inverted_noise else ''}" if args.latent_source == "inverted_noise" else ""}{f", eta {args.inversion_eta}" if args.latent_source == "inversion" else ""} |
| train mode | {args.train_mode}{f", rank {args.rank}" if args.train_mode == "lora" else ""} |
| resolution | {args.resolution} |

{"![validation](validation_grid.png)" if images else ""}

{f'Load it with `pipe.load_lora_weights("{args.hub_model_id or output_dir}")` on the base pipeline.' if args.train_mode == "lora" else f'Load it with `DiffusionPipeline.from_pretrained("{args.hub_model_id or output_dir}")`.'}
"""
    # Built locally rather than through `load_or_create_model_card`, which looks the output folder up on the hub.
    card = ModelCard.from_template(
        ModelCardData(license="openrail++", library_name="diffusers", base_model=args.pretrained_model_name_or_path),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    tags = [
        "text-to-image",
        "diffusers",
        "inpo",
        "diffusion-dpo",
        FAMILY_TAG,
    ]
    if args.train_mode == "lora":
        tags.append("lora")
    populate_model_card(card, tags=tags).save(os.path.join(output_dir, "README.md"))


# Copied from train_inpo.push_output_to_hub
def push_output_to_hub(args):
    repo_id = create_repo(
        args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True, token=args.hub_token
    ).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="InPO training results",
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", ".partial-*"],
        token=args.hub_token,
    )


# Copied from train_inpo.save_kohya_lora
def save_kohya_lora(output_dir):
    """A second copy of the saved LoRA in the kohya / webui key layout, through diffusers' own converters."""
    diffusers_lora = load_file(os.path.join(output_dir, LORA_WEIGHT_NAME))
    kohya_lora = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_lora))
    save_file(kohya_lora, os.path.join(output_dir, KOHYA_LORA_WEIGHT_NAME))


# Copied from train_inpo.save_trained_weights with StableDiffusionPipeline->StableDiffusionXLPipeline
def save_trained_weights(args, accelerator, unet, frozen):
    """The final save on the main process: the diffusers-format LoRA (and its kohya copy) or a full pipeline.
    Call on every process: under FSDP the shards are gathered first."""
    policy = exportable_policy(accelerator, unet)
    if not accelerator.is_main_process:
        return
    if args.train_mode == "lora":
        StableDiffusionXLPipeline.save_lora_weights(args.output_dir, unet_lora_layers=lora_layers(policy))
        if args.output_kohya_format:
            save_kohya_lora(args.output_dir)
    else:
        pipeline = make_pipeline(args, accelerator, unet=policy.to(weight_dtype_of(accelerator)), **frozen)
        pipeline.save_pretrained(args.output_dir)


# Copied from train_inpo.validate_saved_weights
def validate_saved_weights(args, accelerator, frozen):
    """Validation images from what users will load (the saved LoRA on a fresh base pipeline, or the saved UNet),
    then the model card. Main process, after the training state is freed: only the frozen models and one UNet are
    in memory."""
    images = None
    if args.run_validation:
        if args.train_mode == "lora":
            final_pipeline = make_pipeline(args, accelerator, **frozen)
            final_pipeline.load_lora_weights(args.output_dir)
        else:
            saved = UNet2DConditionModel.from_pretrained(
                args.output_dir, subfolder="unet", torch_dtype=weight_dtype_of(accelerator)
            )
            final_pipeline = make_pipeline(args, accelerator, unet=saved, **frozen)
        images = log_validation_images(
            accelerator,
            final_pipeline,
            args.validation_prompts,
            args.seed,
            args.resolution,
            args.max_train_steps,
            tag="final",
        )
    write_model_card(args, args.output_dir, images)
    if args.push_to_hub:
        push_output_to_hub(args)


# --------------------------------------------------------------------------------------------------------------
# Invert once: precompute the inversion cache (its format and reader are in inpo_utils)
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.compute_cache_rows
def compute_cache_rows(batch, frozen, reference, inverse_scheduler, args, accelerator, generator):
    """The cache entries of one batch of pairs: latents and conditioning, then `inpo_utils.cache_rows`."""
    x0 = encode_images(batch["pixel_values"], frozen["vae"], args.vae_encode_batch_size, generator)
    encoder_hidden_states, added_cond_kwargs = encode_prompt(batch, frozen, args, generator)
    with accelerator.autocast():
        return inpo_utils.cache_rows(
            reference,
            x0,
            encoder_hidden_states,
            inverse_scheduler,
            args.cache_dtype,
            draws_per_pair=args.cache_draws_per_pair,
            fresh_noise_mix=args.fresh_noise_mix,
            added_cond_kwargs=added_cond_kwargs,
            generator=generator,
            share_inverted_noise=args.share_inverted_noise,
        )


# Copied from train_inpo.precompute_inversion_cache
def precompute_inversion_cache(args, accelerator, dataset, frozen, reference, inverse_scheduler, fingerprint):
    """Write the cache shard by shard: x0, text conditioning, the inverted noise and each pair's training draws.

    Shard i holds pairs [i·S, (i+1)·S); its contents depend only on i, not on who writes it. The shards still
    missing are dealt out to the processes in turn, so a resumed precompute keeps every process equally busy and
    none waits long at the final barrier. The manifest is written last.
    """
    cache_dir = args.inversion_cache_dir
    if accelerator.is_main_process:
        inpo_utils.write_cache_fingerprint(cache_dir, fingerprint)
    accelerator.wait_for_everyone()
    seed = 0 if args.seed is None else args.seed
    pairs = PreferencePairs(dataset, args.resolution, args.random_crop, not args.no_hflip, seed)
    num_shards = math.ceil(len(pairs) / args.cache_shard_size)
    missing = [i for i in range(num_shards) if not os.path.isfile(inpo_utils.shard_file(cache_dir, i))]
    accelerator.wait_for_everyone()  # every process lists the missing shards before any writes one
    todo = missing[accelerator.process_index :: accelerator.num_processes]
    logger.info(
        f"Inversion cache {cache_dir}: {num_shards} shards, {num_shards - len(missing)} already written; "
        f"{len(todo)} of the missing {len(missing)} to this process.",
        main_process_only=False,
    )
    progress = tqdm(
        total=sum(min(args.cache_shard_size, len(pairs) - i * args.cache_shard_size) for i in todo),
        desc="Inverting pairs",
        unit="pair",
        disable=not accelerator.is_local_main_process,
    )
    written_bytes = 0
    started = time.perf_counter()
    for shard in todo:
        # A generator per shard: its contents do not depend on which process or run writes it.
        generator = torch.Generator(device=accelerator.device).manual_seed(seed * 100003 + shard)
        indices = range(shard * args.cache_shard_size, min((shard + 1) * args.cache_shard_size, len(pairs)))
        columns = {}
        for start in range(0, len(indices), args.train_batch_size):
            examples = [(i, pairs.decoded(i)) for i in indices[start : start + args.train_batch_size]]
            kept = [(i, example) for i, example in examples if example is not None]
            progress.update(len(examples))
            if not kept:
                continue
            batch = collate_pairs([example for _, example in kept])
            rows = compute_cache_rows(batch, frozen, reference, inverse_scheduler, args, accelerator, generator)
            rows["pair_index"] = torch.tensor([i for i, _ in kept])
            for name, value in rows.items():
                columns.setdefault(name, []).append(value.cpu())
        written_bytes += inpo_utils.write_shard(cache_dir, shard, columns, args.cache_dtype)
        elapsed = progress.format_dict["elapsed"] or 1e-9
        progress.set_postfix(pairs_per_s=f"{progress.n / elapsed:.2f}", written=f"{written_bytes / 2**20:.1f}MiB")
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        seconds = time.perf_counter() - started
        inpo_utils.write_cache_manifest(cache_dir, fingerprint, num_shards, seconds, log=logger.info)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


# Copied from train_inpo.check_and_load
def check_and_load(args, accelerator):
    """Cheap checks first (model family and prediction type from configs, the output folder, then the data),
    weights last. Returns (scheduler_config, pairs, collate_fn, dataset, frozen, unet)."""
    logger.info(accelerator.state, main_process_only=False)
    check_sharding(args, accelerator)
    scheduler_config = check_model_family(
        args.pretrained_model_name_or_path, args.revision, args.cache_dir, want_sdxl=IS_SDXL
    )
    check_local_pipeline(args)
    if not args.precompute_inversion_cache:
        check_output_dir(args)
    pairs, collate_fn, dataset = load_training_data(args, accelerator, scheduler_config)
    from_cache = isinstance(pairs, inpo_utils.CachedPairs)
    frozen = {} if from_cache else load_frozen_models(args, accelerator)
    return scheduler_config, pairs, collate_fn, dataset, frozen, load_unet(args)


# Copied from train_inpo.prepare_training
def prepare_training(args, accelerator, pairs, collate_fn, unet):
    """Policy and reference, checkpoint hooks, the step generator, data loader, optimizer and lr schedule, all
    through `accelerator.prepare`. Returns (unet, reference, trainable, optimizer, dataloader, lr_scheduler,
    generator)."""
    seed = 0 if args.seed is None else args.seed
    with_reference = args.inversion_cache_dir is None  # the cache holds the reference's errors
    unet, reference, trainable = setup_policy_and_reference(unet, args, accelerator, with_reference)
    register_checkpoint_hooks(accelerator, args)
    randomness = StepRandomness(seed, accelerator)
    accelerator.register_for_checkpointing(randomness)
    streaming = isinstance(pairs, StreamingPairs)
    if streaming:
        accelerator.register_for_checkpointing(pairs)
    dataloader = make_dataloader(pairs, collate_fn, args)
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(trainable, args)
    if not streaming:  # --streaming requires --max_train_steps
        resolve_max_train_steps(args, len(dataloader) / accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    if streaming:  # each process already reads its own share; DeepSpeed learns the batch size from the config
        if accelerator.state.deepspeed_plugin is not None:
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        prepared = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
        unet, optimizer, dataloader, lr_scheduler = prepared
    if accelerator.is_main_process:
        write_run_settings(args)
        config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)}
        accelerator.init_trackers(args.tracker_name, config)
    return unet, reference, trainable, optimizer, dataloader, lr_scheduler, randomness.generator


# Copied from train_inpo.main
def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    scheduler_config, pairs, collate_fn, dataset, frozen, unet = check_and_load(args, accelerator)
    inverse_scheduler = make_inverse_scheduler(scheduler_config, args, accelerator.device)
    if args.precompute_inversion_cache:
        reference = unet.requires_grad_(False).to(accelerator.device, dtype=weight_dtype_of(accelerator)).eval()
        fingerprint = inpo_utils.cache_fingerprint(args, scheduler_config, IS_SDXL)
        precompute_inversion_cache(args, accelerator, dataset, frozen, reference, inverse_scheduler, fingerprint)
        accelerator.end_training()
        return
    unet, reference, trainable, optimizer, dataloader, lr_scheduler, generator = prepare_training(
        args, accelerator, pairs, collate_fn, unet
    )

    # A stream runs its own epochs without end and restores its position from the checkpoint itself.
    streaming = isinstance(pairs, torch.utils.data.IterableDataset)
    updates_per_epoch = math.inf if streaming else math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = 1 if streaming else math.ceil(args.max_train_steps / updates_per_epoch)
    if isinstance(pairs, inpo_utils.CachedPairs) and num_epochs > pairs.draws_per_pair:
        logger.warning(
            f"This run takes {num_epochs} epochs over the cache, which holds {pairs.draws_per_pair} draw(s) of t and "
            f"fresh noise per pair: from epoch {pairs.draws_per_pair + 1} on, pairs are scored again at draws they "
            f"were trained on. For new draws every epoch, precompute with --cache_draws_per_pair {num_epochs}."
        )
    global_step, first_epoch, batches_to_skip = resume_position(args, accelerator, streaming, updates_per_epoch)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** InPO training *****  pairs = {'streamed' if streaming else len(pairs)}, epochs = {num_epochs}, "
        f"pairs per device per micro-batch = {args.train_batch_size}, total pairs per step (processes x "
        f"accumulation) = {total_batch}, optimizer steps = {args.max_train_steps}, starting at step {global_step}"
    )
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    accumulated, window_loss_is_finite = {}, True
    loss_scaling = uses_loss_scaling(accelerator)
    nonfinite_steps, overflow_steps, consecutive_overflow_steps = 0, 0, 0
    step_started = time.perf_counter()
    for epoch in range(first_epoch, num_epochs):
        unet.train()
        if streaming:  # not prepared by accelerate: each process already reads its own share
            epoch_loader = (send_to_device(batch, accelerator.device) for batch in dataloader)
        else:
            pairs.set_epoch(epoch)
            dataloader.set_epoch(epoch)
            epoch_loader = dataloader
        if epoch == first_epoch and batches_to_skip:
            epoch_loader = accelerator.skip_first_batches(dataloader, batches_to_skip)
        for batch in epoch_loader:
            with accelerator.accumulate(unet):
                if "x0" in batch:  # a batch of the inversion cache: everything but the policy's forward stored
                    loss, metrics = compute_cached_loss(batch, unet, inverse_scheduler, args, accelerator)
                else:
                    x0 = encode_images(batch["pixel_values"], frozen["vae"], args.vae_encode_batch_size, generator)
                    encoder_hidden_states, added_cond_kwargs = encode_prompt(batch, frozen, args, generator)
                    loss, metrics = compute_loss(
                        x0,
                        encoder_hidden_states,
                        added_cond_kwargs,
                        unet,
                        reference,
                        inverse_scheduler,
                        args,
                        accelerator,
                        generator,
                    )
                # A non-finite loss is never backpropagated. Decided on the values of every process, so all of them
                # enter backward's collectives or none does.
                if all_finite(accelerator, loss.detach()):
                    accelerator.backward(loss)
                else:
                    window_loss_is_finite = False
                stepped = False
                if accelerator.sync_gradients and window_loss_is_finite:
                    # Unscales under fp16 first; the norm of the all-reduced gradients is the same on every process.
                    grad_norm = (
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm) if args.max_grad_norm > 0 else None
                    )
                    # With a loss scaler the step is always taken: on overflowing gradients the scaler skips the
                    # update and lowers its scale (and the lr schedule waits). Without one, we skip it ourselves.
                    if loss_scaling or grad_norm is None or math.isfinite(grad_norm):
                        optimizer.step()
                        lr_scheduler.step()
                        stepped = True
                optimizer.zero_grad(set_to_none=True)
            accumulated = accumulate_metrics(accumulated, metrics, args.gradient_accumulation_steps)
            if not accelerator.sync_gradients:
                continue
            accumulated = gather_mean(accelerator, accumulated)
            window_loss_is_finite = True
            if not stepped:
                nonfinite_steps += 1
                check_nonfinite_step(args, accumulated, global_step, nonfinite_steps)
            elif accelerator.optimizer_step_was_skipped:
                overflow_steps += 1
                consecutive_overflow_steps += 1
                check_overflow_steps(consecutive_overflow_steps, global_step + 1, accelerator)
            else:
                consecutive_overflow_steps = 0
            global_step += 1
            progress.update(1)
            accumulated["skipped_nonfinite_steps"] = nonfinite_steps
            accumulated["skipped_overflow_steps"] = overflow_steps
            if accelerator.scaler is not None:
                accumulated["loss_scale"] = accelerator.scaler.get_scale()
            accumulated["lr"] = lr_scheduler.get_last_lr()[0]
            # Seconds per optimizer step, excluding checkpointing and validation (logged for benchmarks/).
            accumulated["step_time"] = time.perf_counter() - step_started
            progress.set_postfix(loss=f"{accumulated['loss']:.4f}", acc=f"{accumulated['implicit_acc']:.2f}")
            accelerator.log(accumulated, step=global_step)
            accumulated = {}
            if global_step % args.checkpointing_steps == 0:
                logger.info(f"Saved {save_checkpoint(accelerator, args, global_step)}")
            if args.run_validation and global_step % args.validation_steps == 0:
                run_validation(args, accelerator, unet, frozen, global_step)
            step_started = time.perf_counter()
            if global_step >= args.max_train_steps:
                break

    if accelerator.distributed_type != DistributedType.FSDP:  # FSDP's processes hold different shards by design
        check_replicas_in_sync(accelerator, trainable)
    accelerator.wait_for_everyone()
    save_trained_weights(args, accelerator, unet, frozen)
    # Free the training UNet, its reference and the optimizer state before the final validation loads a fresh UNet.
    del unet, reference, trainable, optimizer, dataloader, lr_scheduler
    accelerator.free_memory()
    if accelerator.is_main_process:
        validate_saved_weights(args, accelerator, frozen)
    accelerator.end_training()


if __name__ == "__main__":
    main()
