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
"""The training scripts on a CUDA GPU, as a user runs them: one table of peak memory, seconds per step, skipped
(overflow) steps and whether the saved LoRA loads and changes the UNet's output.

    python benchmarks/gpu_check.py            # SD 1.5 at 512 px and SDXL at 1024 px, about 6 minutes on one GPU
    python benchmarks/gpu_check.py --tiny     # the same runs on small random models, on the CPU (a smoke test)

The models have the published SD 1.5 and SDXL architectures (UNet, VAE, CLIP text encoders) with random weights,
built and saved here (nothing is downloaded); their tokenizer is a small character-level CLIP tokenizer. Every run
is `train_inpo.py` / `train_inpo_sdxl.py` with LoRA rank 8, 8-bit AdamW, gradient checkpointing and batch 1, run
in this process so `torch.cuda.max_memory_allocated` sees it: the default (online), the default from the inversion
cache (after its precompute), and Diffusion-DPO (`--latent_source forward`), in fp16 (accelerate's GradScaler) and
bf16, with SDPA and, if installed, xformers. Seconds per step are the mean of the logged `step_time` after the
first step. Writes the table to benchmarks/out/gpu_check.md as well.
"""

import argparse
import contextlib
import io
import os
import runpy
import shutil
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.alignment_world import write_tiny_clip_tokenizer  # noqa: E402
from benchmarks.cache_benchmark import logged_scalars, mean_step_time  # noqa: E402
from benchmarks.pickapic_format import encode_png, write_pickapic_parquet  # noqa: E402


def unet_config(family, tiny):
    if family == "sd":
        config = {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    else:
        config = {
            "sample_size": 128,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }
    if tiny:  # same block layout, small widths
        config.update(block_out_channels=(32,) * len(config["block_out_channels"]), norm_num_groups=8)
        config.update(sample_size=8, cross_attention_dim=32 if family == "sd" else 64, attention_head_dim=8)
        if family == "sdxl":
            config.update(transformer_layers_per_block=1, addition_time_embed_dim=8)
            config.update(projection_class_embeddings_input_dim=32 + 6 * 8)
    return config


def text_config(hidden_size, layers, heads, tiny, vocab_size):
    """CLIP-L (768) or OpenCLIP bigG (1280); tiny: 32 wide, 2 layers."""
    if tiny:
        hidden_size, layers, heads = 32, 2, 2
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "projection_dim": hidden_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def build_pipeline(path, family, tiny):
    """A diffusers pipeline folder with the family's architecture and random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    torch.manual_seed(0)
    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer-src"), max_length=77)
    vae = AutoencoderKL(
        block_out_channels=(32, 32) if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
        layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32,
        latent_channels=4,
        scaling_factor=0.18215 if family == "sd" else 0.13025,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    unet = UNet2DConditionModel(**unet_config(family, tiny))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(768, 12, 12, tiny, len(tokenizer))))
    if family == "sd":
        pipeline = StableDiffusionPipeline(
            vae, text_encoder, tokenizer, unet, scheduler, None, None, requires_safety_checker=False
        )
    else:
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(1280, 32, 20, tiny, len(tokenizer))))
        pipeline = StableDiffusionXLPipeline(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer, unet, scheduler, force_zeros_for_empty_prompt=True
        )
    pipeline.save_pretrained(path)
    shutil.rmtree(os.path.join(path, "tokenizer-src"))
    return path


def build_pairs(path, resolution, num_pairs=8):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_pairs):
        images = [rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8) for _ in range(2)]
        rows.append(
            {
                "caption": f"a photo of thing {i}",
                "jpg_0": encode_png(images[0]),
                "jpg_1": encode_png(images[1]),
                "label_0": float(i % 2),
            }
        )
    return write_pickapic_parquet(path, rows)


def run_script(script, flags):
    """Run a training script in this process, as `python script ...` would; returns (seconds, output tail)."""
    from accelerate.state import AcceleratorState, GradientState

    argv, output = sys.argv, io.StringIO()
    sys.argv = [os.path.join(REPO, script), *map(str, flags)]
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return time.perf_counter() - started, output.getvalue()[-4000:]


def lora_changes_output(family, model_dir, output_dir, device):
    """Load the saved LoRA into a fresh pipeline with `load_lora_weights`; the largest change of the UNet's output."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    pipeline = pipeline_class.from_pretrained(model_dir).to(device)
    unet = pipeline.unet
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=generator).to(device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    kwargs = {}
    if family == "sdxl":
        pooled = pipeline.text_encoder_2.config.projection_dim
        time_ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled).to(device),
            "time_ids": time_ids.to(device),
        }
    with torch.no_grad():
        before = unet(latents, 500, hidden, **kwargs).sample
        pipeline.load_lora_weights(output_dir)
        after = unet(latents, 500, hidden, **kwargs).sample
    change = (after - before).abs().max().item()
    del pipeline, unet
    return change


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Small random models on the CPU (a smoke test).")
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps per run (the first is not timed).")
    parser.add_argument("--families", nargs="+", choices=("sd", "sdxl"), default=["sd", "sdxl"])
    parser.add_argument("--work_dir", default=os.path.join(HERE, "out", "gpu_check"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("No CUDA GPU: run with --tiny for the CPU smoke test.")
    device = "cuda" if cuda else "cpu"
    try:
        import xformers  # noqa: F401

        attention = ["sdpa", "xformers"] if cuda else ["sdpa"]
    except ImportError:
        attention = ["sdpa"]

    rows = []
    for family in args.families:
        script = "train_inpo.py" if family == "sd" else "train_inpo_sdxl.py"
        resolution = 64 if args.tiny else (512 if family == "sd" else 1024)
        work = os.path.join(args.work_dir, ("tiny-" if args.tiny else "") + family)
        started = time.perf_counter()
        model_dir = build_pipeline(os.path.join(work, "model"), family, args.tiny)
        data_dir = os.path.join(work, "pairs")
        if not os.path.isdir(data_dir):
            build_pairs(data_dir, resolution)
        print(f"{family}: random-weight pipeline and pairs ready ({time.perf_counter() - started:.0f} s)", flush=True)
        common = [
            "--pretrained_model_name_or_path",
            model_dir,
            "--dataset_name",
            data_dir,
            "--resolution",
            resolution,
            "--train_batch_size",
            1,
            "--max_train_steps",
            args.steps,
            "--rank",
            8,
            "--learning_rate",
            1e-4,
            "--seed",
            0,
            "--report_to",
            "tensorboard",
            "--checkpointing_steps",
            10**6,
            "--use_8bit_adam",
            "--gradient_checkpointing",
        ]
        runs = [
            ("default (online)", "fp16", "sdpa", []),
            ("default (online)", "bf16", "sdpa", []),
            ("default from the cache", "fp16", "sdpa", ["cache"]),
            ("default from the cache", "bf16", "sdpa", ["cache"]),
            ("Diffusion-DPO (--latent_source forward)", "fp16", "sdpa", ["--latent_source", "forward"]),
        ]
        runs += [("default (online)", "fp16", "xformers", [])] if "xformers" in attention else []
        for method, precision, attention_kind, extra in runs:
            precision = "no" if not cuda else precision
            out = os.path.join(work, f"run-{len(rows)}")
            shutil.rmtree(out, ignore_errors=True)
            flags = common + ["--output_dir", out, "--mixed_precision", precision]
            if attention_kind == "xformers":
                flags.append("--enable_xformers_memory_efficient_attention")
            if extra == ["cache"]:
                cache = os.path.join(work, f"cache-{precision}")
                if not os.path.isfile(os.path.join(cache, "manifest.json")):
                    shutil.rmtree(cache, ignore_errors=True)
                    seconds, tail = run_script(
                        script, flags + ["--inversion_cache_dir", cache, "--precompute_inversion_cache"]
                    )
                    print(f"  precompute ({precision}): {seconds:.0f} s for 8 pairs", flush=True)
                extra = ["--inversion_cache_dir", cache]
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds, tail = run_script(script, flags + extra)
                failure = ""
            except (Exception, SystemExit) as error:  # the table reports it and the check goes on
                seconds, failure = float("nan"), f"{type(error).__name__}: {error}"[:120]
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            skipped = logged_scalars(out, "skipped_overflow_steps")
            change = float("nan")
            if not failure:
                change = lora_changes_output(family, model_dir, out, device)
            rows.append(
                (
                    family,
                    method,
                    precision,
                    attention_kind,
                    peak,
                    mean_step_time(out),
                    int(max(skipped.values())) if skipped else 0,
                    change,
                    failure,
                )
            )
            print("  " + " | ".join(map(str, rows[-1])), flush=True)

    lines = [
        f"{'CUDA: ' + torch.cuda.get_device_name() if cuda else 'CPU (smoke test)'}; torch {torch.__version__}; "
        f"batch 1, LoRA rank 8, 8-bit AdamW, gradient checkpointing, {args.steps} steps.",
        "",
        "| model | method | precision | attention | peak GPU memory (GiB) | s / step | skipped overflow steps "
        "| LoRA loads: max output change | failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, method, precision, attention_kind, peak, step, skipped, change, failure in rows:
        name = "SD 1.5, 512 px" if family == "sd" else "SDXL, 1024 px"
        name = f"tiny {family}" if args.tiny else name
        lines.append(
            f"| {name} | {method} | {precision} | {attention_kind} | {peak:.1f} | {step:.2f} | {skipped} "
            f"| {change:.3g} | {failure} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.work_dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(args.work_dir), "gpu_check.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
