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
"""Step time and peak memory of InPO from the cache vs online vs Diffusion-DPO (forward noise), through train_inpo.py.

    python benchmarks/cache_benchmark.py --model tiny
    python benchmarks/cache_benchmark.py --model sd15 --resolution 64 --steps 6

`tiny` is the tests' tiny pipeline (tests/fixtures.py); `sd15` has the published SD 1.5 UNet/VAE/CLIP-L architectures with random
weights (no download), run at a low resolution so a CPU can afford it. Every method trains the same LoRA on the same
pairs with the same batch, each with the scripts' own settings: (a) the default (--latent_source inverted_noise)
from the inversion cache, precomputed once (timed on its own) and then trained from, (b) the default online, (c) the
paper's InPO online (--latent_source inversion), (d) Diffusion-DPO (--latent_source forward). Step time is the mean
`step_time` the script logs (first step excluded), peak RSS is `/usr/bin/time`'s maximum resident set size of the
whole training process. Prints a markdown table and writes it to benchmarks/out/cache_benchmark_<model>.md.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import fixtures  # noqa: E402
from benchmarks.alignment_world import write_tiny_clip_tokenizer  # noqa: E402


SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512,
}
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}


def build_sd15_random(path):
    """SD 1.5 architectures with random weights, saved as a diffusers pipeline (about 4 GB in fp32)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"), max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **CLIP_L_TEXT)
    )
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET),
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=fixtures.tiny_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def timed_run(args_list, log_path):
    """Run train_inpo.py under /usr/bin/time -v; return (wall seconds, peak RSS in MiB)."""
    command = ["/usr/bin/time", "-v", sys.executable, os.path.join(REPO, "train_inpo.py"), *map(str, args_list)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    with open(log_path, "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"train_inpo.py failed, see {log_path}:\n{result.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, peak_kib / 1024


def logged_scalars(output_dir, tag):
    """{step: value} of a scalar a training run logged to tensorboard under `output_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for root, _, files in os.walk(os.path.join(output_dir, "logs")):
        if any(name.startswith("events.out") for name in files):
            events = EventAccumulator(root)
            events.Reload()
            if tag in events.Tags()["scalars"]:
                values.update({event.step: event.value for event in events.Scalars(tag)})
    return values


def mean_step_time(output_dir):
    """Mean logged `step_time` after the first step, which pays for warm-up."""
    later = [value for step, value in sorted(logged_scalars(output_dir, "step_time").items()) if step > 1]
    return sum(later) / max(len(later), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 32 (tiny), 64 (sd15).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per method. Default: 20 / 6.")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--work_dir", default=os.path.join(HERE, "out", "cache_benchmark"))
    parser.add_argument(
        "--skip_paper",
        action="store_true",
        help="Leave out (c), the paper's InPO (its policy inversion makes it the slowest by far at 512 px on a CPU).",
    )
    args = parser.parse_args()
    resolution = args.resolution or (32 if args.model == "tiny" else 64)
    steps = args.steps or (20 if args.model == "tiny" else 6)
    work = os.path.join(args.work_dir, args.model)
    os.makedirs(work, exist_ok=True)

    model_dir = os.path.join(work, "model")
    if args.model == "tiny":
        model_dir = fixtures.build_tiny_sd(model_dir) if not os.path.isdir(model_dir) else model_dir
    else:
        build_sd15_random(model_dir)
    data_dir = os.path.join(work, "pairs")
    if not os.path.isdir(data_dir):
        fixtures.build_tiny_pickapic(data_dir, num_pairs=args.pairs, image_size=(resolution, resolution + 16))

    common = [
        "--pretrained_model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--resolution",
        resolution,
        "--train_batch_size",
        args.train_batch_size,
        "--max_train_steps",
        steps,
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
    ]
    # Each method with the scripts' own settings: the default K = 5 and fresh noise mix 0.5, the paper's K = 10
    # and eta 0.1.
    cache_dir = os.path.join(work, "cache")
    cache_flags = ["--inversion_cache_dir", cache_dir]
    methods = [
        ("(a) the default from the cache", cache_flags),
        ("(b) the default online", []),
        ("(c) the paper's InPO online (policy inversion, eta 0.1)", ["--latent_source", "inversion"]),
        ("(d) Diffusion-DPO (forward noise)", ["--latent_source", "forward"]),
    ]

    # The precompute (once, fresh cache each time), timed on its own; (a) then trains from it.
    shutil.rmtree(cache_dir, ignore_errors=True)
    wall, peak = timed_run(
        common + cache_flags + ["--output_dir", os.path.join(work, "precompute"), "--precompute_inversion_cache"],
        os.path.join(work, "precompute.log"),
    )
    manifest = json.load(open(os.path.join(cache_dir, "manifest.json")))
    precompute = (manifest["num_pairs"] / manifest["seconds_last_run"], manifest["bytes_per_pair"], peak)

    if args.skip_paper:
        methods = [method for method in methods if not method[0].startswith("(c)")]
    rows = []
    for name, flags in methods:
        out = os.path.join(work, re.sub(r"\W+", "-", name).strip("-"))
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = timed_run(common + flags + ["--output_dir", out], out + ".log")
        rows.append((name, mean_step_time(out), peak, wall))

    forward_time = rows[-1][1]
    lines = [
        f"Model `{args.model}` at {resolution} px, batch {args.train_batch_size} pairs, LoRA rank 8, {steps} steps, "
        f"K = 5 for the default and 10 for the paper's InPO, {os.cpu_count()} CPU cores.",
        "",
        "| method | mean step time (s) | × forward-noise DPO | peak RSS (MiB) | wall incl. start-up (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:.3f} | {t / forward_time:.2f} | {p:.0f} | {w:.0f} |" for n, t, p, w in rows]
    lines += [
        "",
        f"Precompute: {precompute[0]:.2f} pairs/s, peak RSS {precompute[2]:.0f} MiB; cache size per pair: "
        f"{precompute[1] / 1024:.1f} KiB (the inverted noise and one training draw, fp16).",
    ]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(HERE, "out", f"cache_benchmark_{args.model}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
