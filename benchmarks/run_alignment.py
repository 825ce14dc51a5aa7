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
"""Alignment benchmark: InPO variants against Diffusion-DPO in a world with a known reward.

    python benchmarks/run_alignment.py            # default settings, < 30 min on 2 CPU cores
    python benchmarks/run_alignment.py --quick    # smoke test of the whole path (~1 min)

The base model and the pairs are cached under --out_dir, keyed by fingerprint. Measured on 2 lightly loaded CPU
cores: 14 min from an empty --out_dir, of which the base model takes ~6 min and the 512 pairs ~1.3 min. When other
jobs load the cores, run with OMP_NUM_THREADS=1: two threads per process on busy cores make tiny models crawl.

Steps: pretrain (or load) the tiny base model of alignment_world.py, sample preference pairs from it labelled by
the reward, then train every method with train_inpo.py on the same pairs with the same β, learning rate, LoRA
rank, batch size, seed and number of steps, and evaluate the LoRA exported at every checkpoint on fixed prompts
and seeds: mean reward, win rate against the base model (same prompt and seed, ties ½) and caption fidelity.

Writes to --out_dir (with --quick: --out_dir/quick), as alignment_<reward>[_flipped]_seed<seed>_*: table.md
(also printed), reward.png (reward and win rate against steps), grid.png (base vs each method's final LoRA, one
sample per caption) and results.json (all numbers). --flipped_labels trains on the same pairs with the labels
swapped: the control, under which an aligning method must not raise the reward.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

from diffusers.utils import logging as diffusers_logging


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import alignment_world as world


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# Method name -> the train_inpo.py flags that make it that method; everything else is shared.
# The inverted-noise methods (--latent_source inverted_noise: one fixed noise per image from a deterministic
# inversion by the frozen reference, its x0 component removed, what the inversion cache stores) pin both their fresh
# noise mix (0 unless the name says mix50 / mix90) and K (10 unless the name says k5 / k50), where the scripts'
# defaults are 0.9 and 5: pinned, so each method's numbers do not move with the defaults.
def inverted_noise_flags(fresh_noise_mix, inversion_steps):
    return [
        *["--latent_source", "inverted_noise", "--fresh_noise_mix", str(fresh_noise_mix)],
        *["--inversion_steps", str(inversion_steps)],
    ]


METHODS = {
    "default": [],  # train_inpo.py's own defaults, whatever they are
    # The paper's InPO: DDIM inversion up to t by the policy, grid endpoint, eta 0.1, K = 10 (its defaults).
    "inpo_grid": ["--latent_source", "inversion"],
    "diffusion_dpo": ["--latent_source", "forward"],
    "inverted_noise": inverted_noise_flags(0, 10),
    "inverted_noise_mix50": inverted_noise_flags(0.5, 10),
    "inverted_noise_k50": inverted_noise_flags(0, 50),
    "inverted_noise_mix50_k5": inverted_noise_flags(0.5, 5),
    # The default with the pair's two inverted noises made one (--share_inverted_noise).
    "inverted_noise_mix50_k5_shared": [*inverted_noise_flags(0.5, 5), "--share_inverted_noise"],
    # The scripts' defaults, pinned (mix 0.9 chosen on benchmarks/run_suite.py's worlds against 0.5).
    "inverted_noise_mix90_k5": inverted_noise_flags(0.9, 5),
}
# Methods trained from the invert-once cache: train_inpo.py first writes it (--precompute_inversion_cache), then
# trains from it; their wall time is the sum of both runs. The cache stores each pair's inverted noise and one
# training draw (t, fresh-noise seed, the reference's errors; reused every epoch), so a cached step is one policy
# forward and backward. The documented numbers of these methods (docs/) were trained from the cache's earlier layouts
# (the reference's errors at the grid timesteps, or t and e_ref drawn anew every step with the fresh noise mix):
# run_alignment.py of commit 50197e0 reproduces those; this one trains from the stored draws, another measurement.
CACHED_METHODS = {
    "inverted_noise_cached": inverted_noise_flags(0, 10),
    "inverted_noise_mix50_cached": inverted_noise_flags(0.5, 10),
    # Half the inversion steps: the precompute is K + 1 reference forwards per image (the inversion, then the draw's
    # errors), the first cached run's main cost.
    "inverted_noise_mix50_cached_k5": inverted_noise_flags(0.5, 5),
    # The default from the cache with two draws per pair: 100 steps of batch 8 on 512 pairs are 1.6 epochs, so every
    # pair meets a new t and fresh noise in its second epoch, as online training's.
    "inverted_noise_mix50_cached_k5_draws2": [*inverted_noise_flags(0.5, 5), "--cache_draws_per_pair", "2"],
    "inverted_noise_mix90_cached_k5": inverted_noise_flags(0.9, 5),
}
METHODS.update(CACHED_METHODS)
DEFAULT_METHODS = ["inpo_grid", "diffusion_dpo", "inverted_noise"]
# train_inpo.py's --latent_source when a method passes none (the `default` method).
DEFAULT_LATENT_SOURCE = "inverted_noise"

# --quick: every stage runs, on sizes that only check the plumbing (the numbers mean nothing).
QUICK = {
    "num_pairs": 16,
    "max_train_steps": 4,
    "eval_every": 2,
    "eval_seeds": 1,
    "train_batch_size": 2,
    "num_inference_steps": 4,
}
QUICK_BASE = {"num_train_images": 256, "vae_steps": 20, "unet_steps": 20}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "out"))
    parser.add_argument("--quick", action="store_true", help="Tiny sizes everywhere; outputs in OUT_DIR/quick.")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT_METHODS)
    parser.add_argument(
        "--world",
        choices=sorted(world.WORLDS),
        default=world.DEFAULT_WORLD,
        help="The base model's world (alignment_world.WORLDS); its reward unless --reward.",
    )
    parser.add_argument("--reward", choices=sorted(world.REWARDS), default=None, help="Default: the world's.")
    parser.add_argument(
        "--flipped_labels",
        action="store_true",
        help="Control: the same pairs with the labels swapped; the reward must not rise.",
    )
    parser.add_argument(
        "--results_tag",
        default=None,
        help="Appended to the output files' names, so that invocations with other --methods on the same reward and "
        "seed do not overwrite each other (summarize_alignment.py merges them).",
    )
    parser.add_argument("--num_pairs", type=int, default=512, help="Preference pairs sampled from the base model.")
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=50, help="Checkpoint (and evaluation) interval in steps.")
    parser.add_argument("--eval_seeds", type=int, default=8, help="Evaluation seeds per caption (12 captions).")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=3e-4,
        help="From sweep_alignment.py: the largest InPO gain at which no aligning method collapsed.",
    )
    parser.add_argument("--beta_dpo", type=float, default=1000.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="Training seed; also the base model's unless --base_seed.")
    parser.add_argument(
        "--base_seed",
        type=int,
        default=None,
        help="Seed of the base model (and so of its pairs): repeat training seeds on one world.",
    )
    parser.add_argument(
        "--inversion_steps",
        type=int,
        default=None,
        help="Default: train_inpo.py's. Passed to the methods that invert (not diffusion_dpo); the inverted-noise "
        "methods pin their own.",
    )
    parser.add_argument(
        "--inversion_eta",
        type=float,
        default=None,
        help="Default: train_inpo.py's (0.1). Passed only to the methods with --latent_source inversion (inpo_grid); "
        "the others' inversions are deterministic.",
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=world.NUM_INFERENCE_STEPS,
        help="DDIM steps for pairs and evaluation.",
    )
    parser.add_argument("--guidance_scale", type=float, default=world.GUIDANCE_SCALE)
    parser.add_argument(
        "--final_guidance_scales",
        type=float,
        nargs="*",
        default=[],
        help="Also evaluate the base model and each method's final LoRA at these guidance scales.",
    )
    args = parser.parse_args(argv)
    args.reward = args.reward or world.WORLDS[args.world].reward
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.out_dir = os.path.join(args.out_dir, "quick")
    return args


def base_config(args):
    seed = args.seed if args.base_seed is None else args.base_seed
    return dataclasses.replace(world.WORLDS[args.world].config, seed=seed, **(QUICK_BASE if args.quick else {}))


def latent_source(method):
    """The --latent_source that `method` trains with."""
    flags = METHODS[method]
    sources = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--latent_source"]
    return sources[-1] if sources else DEFAULT_LATENT_SOURCE


# The training script of each base-model family (alignment_world.BaseModelConfig.family).
SCRIPTS = {"sd": "train_inpo.py", "sd3": "train_inpo_sd3.py"}


def train_command(args, method, base_dir, pairs_dir, run_dir):
    source = latent_source(method)
    family = world.family_of(base_dir)
    # An SD3 world conditions on zero T5 tokens of its own length: trained with the length it was pretrained with.
    max_sequence_length = world.max_sequence_length_of(base_dir)
    # train_inpo.py refuses --inversion_steps with forward noising and --inversion_eta without --latent_source
    # inversion: each is passed to the methods that take it (a method's own flags come last and win).
    inversion_steps = args.inversion_steps is not None and source != "forward"
    inversion_eta = args.inversion_eta is not None and source == "inversion"
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        os.path.join(REPO_ROOT, SCRIPTS[family]),
        "--pretrained_model_name_or_path",
        base_dir,
        "--dataset_name",
        pairs_dir,
        "--output_dir",
        run_dir,
        "--resolution",
        str(world.image_size_of(base_dir)),
        "--train_batch_size",
        str(args.train_batch_size),
        "--max_train_steps",
        str(args.max_train_steps),
        "--learning_rate",
        str(args.learning_rate),
        "--beta_dpo",
        str(args.beta_dpo),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        # Its logged step_time is the training seconds of the benchmark tables (start-up and checkpoints excluded).
        "--report_to",
        "tensorboard",
        "--checkpointing_steps",
        str(args.eval_every),
        *(["--inversion_steps", str(args.inversion_steps)] if inversion_steps else []),
        *(["--inversion_eta", str(args.inversion_eta)] if inversion_eta else []),
        *(["--without_t5", "--max_sequence_length", str(max_sequence_length)] if family == "sd3" else []),
        *METHODS[method],
    ]


def train(args, method, base_dir, pairs_dir, run_dir):
    """Run train_inpo.py for `method` into a fresh `run_dir`; returns wall seconds. Its output goes to train.log."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale run would be resumed from or mixed into the table
    os.makedirs(run_dir)
    log_path = os.path.join(run_dir, "train.log")
    command = train_command(args, method, base_dir, pairs_dir, run_dir)
    commands = [command]
    if method in CACHED_METHODS:
        cache = ["--inversion_cache_dir", os.path.join(run_dir, "inversion_cache")]
        commands = [[*command, *cache, "--precompute_inversion_cache"], [*command, *cache]]
    start = time.time()
    with open(log_path, "w") as log:
        for command in commands:
            print(f"[{method}] training: {' '.join(command)}", flush=True)
            result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
            if result.returncode != 0:
                with open(log_path) as log:
                    tail = log.read()[-3000:]
                raise RuntimeError(
                    f"[{method}] train_inpo.py failed (exit {result.returncode}); end of {log_path}:\n{tail}"
                )
    seconds = time.time() - start
    print(
        f"[{method}] trained in {seconds:.0f} s (cache precompute included)"
        if len(commands) > 1
        else f"[{method}] trained in {seconds:.0f} s",
        flush=True,
    )
    return seconds


def training_seconds(run_dir):
    """{"step_seconds": train_inpo.py's logged step_time summed, "precompute_seconds": the cache's precompute, or 0}.

    Start-up, checkpointing and evaluation are left out: they do not grow with the number of steps.
    """
    from benchmarks.cache_benchmark import logged_scalars

    precompute = 0.0
    manifest = os.path.join(run_dir, "inversion_cache", "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            precompute = json.load(f)["seconds_last_run"]
    return {"step_seconds": sum(logged_scalars(run_dir, "step_time").values()), "precompute_seconds": precompute}


def lora_exports(run_dir, max_train_steps):
    """[(step, folder with pytorch_lora_weights.safetensors)] in step order; the final export is the last."""
    exports = {}
    for name in os.listdir(run_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        folder = os.path.join(run_dir, name)
        if match and os.path.exists(os.path.join(folder, LORA_WEIGHT_NAME)):
            exports[int(match.group(1))] = folder
    exports[max_train_steps] = run_dir  # the end-of-training export is the same weights as a last checkpoint
    return sorted(exports.items())


def score(result, base_rewards):
    return {
        "mean_reward": result["mean_reward"],
        "win_rate": world.win_rate(result["rewards"], base_rewards),
        "fidelity": result["fidelity"],
        "quality": result["quality"],
    }


def evaluate_method(pipe, args, run_dir, captions, seeds, base_rewards):
    """Rows {step, mean_reward, win_rate, fidelity, quality} for every LoRA export, and the final samples (N, 32, 32, 3)."""
    rows, final_images = [], None
    for step, folder in lora_exports(run_dir, args.max_train_steps):
        result = world.evaluate_lora(pipe, folder, captions, seeds, **sampling_kwargs(args))
        rows.append({"step": step, **score(result, base_rewards)})
        final_images = result["images"]
        print(f"  step {step}: {rows[-1]}", flush=True)
    return rows, final_images


def markdown_table(args, results, base_meta, pairs_meta, num_eval_images):
    lines = [
        f"# Alignment benchmark: reward `{args.reward}`"
        + (", flipped labels (control)" if args.flipped_labels else ""),
        "",
        f"{args.num_pairs} pairs sampled from the base model (labels {pairs_meta['label_counts']}, mean reward gap "
        f"{pairs_meta['mean_reward_gap']}); every method: batch {args.train_batch_size}, β {args.beta_dpo:g}, "
        f"lr {args.learning_rate:g}, LoRA rank {args.rank}, seed {args.seed}, {args.max_train_steps} steps, "
        f"{args.inversion_steps or 'the default number of'} inversion steps and, for the paper's inversion, eta "
        f"{'default' if args.inversion_eta is None else f'{args.inversion_eta:g}'} (unless the method sets them). "
        f"Evaluation: {num_eval_images} samples (12 captions × {args.eval_seeds} seeds), "
        f"{args.num_inference_steps} DDIM steps, guidance {args.guidance_scale:g}. Base model: fidelity "
        f"{base_meta['samples']['fidelity']:.3f}, built in {base_meta['train_seconds']} s.",
        "",
        (
            "| method | step | mean reward | win rate vs base | fidelity (chance 0.25) | background roughness "
            "(lower is cleaner) | train wall time (s) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, result in results.items():
        seconds = f"{result['train_seconds']:.0f}" if "train_seconds" in result else "–"
        for row in result["rows"]:
            lines.append(
                f"| {method} | {row['step']} | {row['mean_reward']:.4f} | {row['win_rate']:.3f} | "
                f"{row['fidelity']:.3f} | {row['quality']:.4f} | {seconds} |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(results, path, reward_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = results["base"]["rows"][0]
    for method, result in results.items():
        if method == "base":
            continue
        rows = [base] + result["rows"]  # every curve starts at the base model
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["mean_reward"] for r in rows], marker="o", label=method)
        axes[1].plot(steps, [r["win_rate"] for r in rows], marker="o", label=method)
    axes[0].set(xlabel="training step", ylabel=f"mean {reward_name}", title="Reward")
    axes[1].set(xlabel="training step", ylabel="win rate vs base", title="Win rate (ties ½)")
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(samples, eval_seeds, path):
    """Rows: base and each method's final LoRA; columns: every caption at evaluation seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captions = world.ALL_CAPTIONS
    fig, axes = plt.subplots(
        len(samples), len(captions), figsize=(1.1 * len(captions), 1.3 * len(samples)), squeeze=False
    )
    for row, (name, images) in enumerate(samples.items()):
        for col, caption in enumerate(captions):
            ax = axes[row, col]
            ax.imshow(images[col * eval_seeds])  # eval_prompts is caption-major: seed 0 of caption `col`
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(caption.removeprefix("a "), fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sampling_kwargs(args):
    return {
        "reward_name": args.reward,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
    }


def prepare_world(args, model_config=None):
    """Build (or load from the cache) the base model (`model_config`: a BaseModelConfig, by default
    `base_config(args)`) and the pairs; returns (pipe, base_meta, pairs_meta, (base_dir, pairs_dir)).
    """
    # Loading a UNet-only LoRA warns about the text encoder at every evaluation; progress bars drown the table.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    os.makedirs(args.out_dir, exist_ok=True)
    base_dir, pairs_dir = os.path.join(args.out_dir, "base_model"), os.path.join(args.out_dir, "pairs", run_tag(args))
    base_meta = world.build_base_model(
        base_dir,
        model_config or base_config(args),
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
    )
    pipe = world.load_pipeline(base_dir)
    pairs_meta = world.make_preference_pairs(
        pipe,
        pairs_dir,
        args.num_pairs,
        args.reward,
        args.num_inference_steps,
        args.guidance_scale,
        fingerprint=base_meta["fingerprint"],
        flip_labels=args.flipped_labels,
        image_cache=os.path.join(args.out_dir, "pair_images.npz"),
    )
    return pipe, base_meta, pairs_meta, (base_dir, pairs_dir)


def run_tag(args):
    """The reward and label direction: runs, pairs and outputs of different ones live side by side."""
    return args.reward + ("_flipped" if args.flipped_labels else "")


def main(argv=None, model_config=None):
    """Run the benchmark (on a base model built from `model_config`, by default `base_config(args)`).

    Returns {"base" or method: {"rows": [{step, mean_reward, win_rate, fidelity, quality}, ...], ...}}.
    """
    args = parse_args(argv)
    start = time.time()
    pipe, base_meta, pairs_meta, (base_dir, pairs_dir) = prepare_world(args, model_config)
    captions, seeds = world.eval_prompts(args.eval_seeds)
    base = world.evaluate(pipe, captions, seeds, **sampling_kwargs(args))
    results = {"base": {"rows": [{"step": 0, **score(base, base["rewards"])}]}}
    samples = {"base": base["images"]}
    print(f"[base] {results['base']['rows'][0]}", flush=True)

    base_at = {}
    for scale in args.final_guidance_scales:
        base_at[scale] = world.evaluate(pipe, captions, seeds, **{**sampling_kwargs(args), "guidance_scale": scale})
        results["base"].setdefault("final_at_guidance", {})[str(scale)] = score(
            base_at[scale], base_at[scale]["rewards"]
        )

    for method in args.methods:
        run_dir = os.path.join(args.out_dir, "runs", run_tag(args), f"{method}_seed{args.seed}")
        seconds = train(args, method, base_dir, pairs_dir, run_dir)
        rows, samples[method] = evaluate_method(pipe, args, run_dir, captions, seeds, base["rewards"])
        results[method] = {"train_seconds": seconds, **training_seconds(run_dir), "rows": rows}
        for scale, base_result in base_at.items():
            result = world.evaluate_lora(
                pipe, run_dir, captions, seeds, **{**sampling_kwargs(args), "guidance_scale": scale}
            )
            results[method].setdefault("final_at_guidance", {})[str(scale)] = score(result, base_result["rewards"])

    table = markdown_table(args, results, base_meta, pairs_meta, len(captions))
    print(table)
    tag = f"_{args.results_tag}" if args.results_tag else ""
    prefix = os.path.join(args.out_dir, f"alignment_{run_tag(args)}_seed{args.seed}{tag}")
    with open(f"{prefix}_table.md", "w") as f:
        f.write(table)
    plot_curves(results, f"{prefix}_reward.png", args.reward)
    plot_grid(samples, args.eval_seeds, f"{prefix}_grid.png")
    with open(f"{prefix}_results.json", "w") as f:
        json.dump(
            {
                "args": vars(args),
                "base_model": base_meta,
                "pairs": pairs_meta,
                "results": results,
                "total_seconds": round(time.time() - start, 1),
            },
            f,
            indent=2,
        )
    print(f"Wrote {prefix}_{{table.md,reward.png,grid.png,results.json}} ({time.time() - start:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
