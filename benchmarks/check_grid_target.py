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
"""Which way does each method's first gradient push the samples? A check of the grid-endpoint hypothesis.

    python benchmarks/check_grid_target.py    # after run_alignment.py has built the base model and pairs

With the grid endpoint the inverted latent sits at τ_last < t while the target uses ᾱ_t, so
ε* = (x_inv − √ᾱ_t·x0)/√(1−ᾱ_t) carries about c·x0 with c = (√ᾱ_τ − √ᾱ_t)/√(1−ᾱ_t) > 0. Fitting the winner's ε*
then teaches ε_θ a copy of the winner, which sampling subtracts (x̂0 = (x_t − √(1−ᾱ)·ε_θ)/√ᾱ): anti-alignment.

At the first step the policy is the reference, and the loss moves ε_θ,w towards ε*_w and ε_θ,l away from ε*_l, so
ε_θ changes along δ = (ε*_w − ε_ref,w) − (ε*_l − ε_ref,l). Projected on the preference direction of the data,
b = mean over pairs of (x0_w − x0_l) (for background brightness: brighter backgrounds, with shapes averaged
out), a positive push
<δ, b> raises ε along b and so lowers x̂0 along b: it trains the model away from the preferred images.

Prints, for each latent source on the same pairs and timesteps: the fitted x0 coefficient of the target (and the
grid's predicted c), the mean push <δ, b>/|b|, and the fraction of pairs pushed the wrong way; then the cosine
similarity of ε* with x0 per timestep bin (how much of the image the regression target carries at each noise level).
"""

import argparse
import io
import os
import sys

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inpo_utils
from benchmarks import alignment_world as world
from benchmarks import run_alignment


# Name -> source_latents keywords. The inverted-noise sources invert with the base model (policy = reference here).
SOURCES = {
    "inpo_grid": {"latent_source": "inversion", "endpoint": "grid"},
    "inpo_exact": {"latent_source": "inversion", "endpoint": "exact"},
    "diffusion_dpo": {"latent_source": "forward"},
    "inverted_noise": {"latent_source": "inverted_noise", "x0_projection": "remove"},
    "inverted_noise_keep_x0": {"latent_source": "inverted_noise", "x0_projection": "none"},
    "hybrid": {"latent_source": "hybrid", "endpoint": "exact", "hybrid_start": 401},  # τ0 = 500 on the K=10 grid
}
# Timestep bins of the ε*–x0 correlation table.
BINS = [(0, 100), (100, 300), (300, 500), (500, 700), (700, 900), (900, 1000)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(run_alignment.REPO_ROOT, "benchmarks", "out"))
    parser.add_argument("--num_pairs", type=int, default=256, help="Pairs read from OUT_DIR/pairs/REWARD.")
    parser.add_argument("--reward", choices=sorted(world.REWARDS), default=world.DEFAULT_REWARD)
    parser.add_argument("--inversion_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@torch.no_grad()
def load_pairs(pipe, pairs_dir, num_pairs):
    """Winner-first latents (2N, 4, 16, 16) and text embeddings (2N, L, D) of the first `num_pairs` decided pairs."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(os.path.join(pairs_dir, "train-00000-of-00001.parquet")).to_pylist()
    rows = [r for r in table if r["label_0"] in (0.0, 1.0)][:num_pairs]

    def decode(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    winners = [decode(r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"]) for r in rows]
    losers = [decode(r["jpg_1"] if r["label_0"] == 1.0 else r["jpg_0"]) for r in rows]
    pixels = world._to_model_range(np.stack(winners + losers))
    x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    captions = [r["caption"] for r in rows] * 2
    return x0, world._caption_embeddings(pipe.tokenizer, pipe.text_encoder, captions)


def flat_dot(a, b):
    return (a * b).flatten(1).sum(1)


@torch.no_grad()
def measure(pipe, x0, embeddings, source, inverse_scheduler, timesteps, direction, seed):
    alphas_cumprod = inverse_scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    latents, target = inpo_utils.source_latents(
        x0=x0,
        timesteps=timesteps,
        inversion_unet=pipe.unet,
        encoder_hidden_states=embeddings,
        inverse_scheduler=inverse_scheduler,
        alphas_cumprod=alphas_cumprod,
        generator=generator,
        **source,
    )
    reference = pipe.unet(latents, timesteps, embeddings).sample
    residual_w, residual_l = (target - reference).chunk(2)
    push = flat_dot(residual_w - residual_l, direction) / direction.norm()
    return {
        "target_x0_coefficient": float((flat_dot(target, x0) / flat_dot(x0, x0)).mean()),
        "mean_push": float(push.mean()),
        "wrong_way_fraction": float((push > 0).float().mean()),
        "x0_correlation": flat_dot(target, x0) / (target.flatten(1).norm(dim=1) * x0.flatten(1).norm(dim=1)),
    }


def predicted_grid_coefficient(inverse_scheduler, timesteps):
    """Mean of c = (√ᾱ_τ − √ᾱ_t)/√(1−ᾱ_t) with τ the last grid point below t (ᾱ_τ the initial ᾱ if none)."""
    alphas_cumprod = inverse_scheduler.alphas_cumprod
    grid = inverse_scheduler.timesteps
    below = [grid[grid < t] for t in timesteps.tolist()]
    a_tau = torch.stack(
        [alphas_cumprod[g.max()] if len(g) else inverse_scheduler.initial_alpha_cumprod for g in below]
    )
    a_t = alphas_cumprod[timesteps]
    return float(((a_tau.sqrt() - a_t.sqrt()) / (1 - a_t).sqrt()).mean())


def main(argv=None):
    args = parse_args(argv)
    diffusers_logging.disable_progress_bar()
    pipe = world.load_pipeline(os.path.join(args.out_dir, "base_model"))
    x0, embeddings = load_pairs(pipe, os.path.join(args.out_dir, "pairs", args.reward), args.num_pairs)
    num_pairs = len(x0) // 2
    direction = (x0[:num_pairs] - x0[num_pairs:]).mean(0, keepdim=True)
    inverse_scheduler = inpo_utils.make_inverse_scheduler(pipe.scheduler.config, args.inversion_steps)
    generator = torch.Generator().manual_seed(args.seed)
    timesteps = torch.randint(0, inverse_scheduler.config.num_train_timesteps, (num_pairs,), generator=generator)
    timesteps = timesteps.repeat(2)  # the same t for both images of a pair, as in training
    print(
        f"{num_pairs} pairs, t ~ U{{0..999}}; predicted x0 coefficient of the grid target: "
        f"{predicted_grid_coefficient(inverse_scheduler, timesteps[:num_pairs]):.4f}"
    )
    print("| latent source | x0 coefficient of ε* | push along preference, <δ,b>/|b| | pairs pushed the wrong way |")
    print("|---|---:|---:|---:|")
    correlations = {}
    for name, source in SOURCES.items():
        m = measure(pipe, x0, embeddings, source, inverse_scheduler, timesteps, direction, args.seed)
        correlations[name] = m["x0_correlation"]
        print(f"| {name} | {m['target_x0_coefficient']:.4f} | {m['mean_push']:+.4f} | {m['wrong_way_fraction']:.3f} |")
    # How much of x0 the regression target carries, by timestep: 0 for independent noise (Diffusion-DPO's ε).
    print("\nCosine similarity of ε* with x0 per image, mean by timestep bin:\n")
    print("| latent source | " + " | ".join(f"t in [{low}, {high})" for low, high in BINS) + " |")
    print("|---|" + "---:|" * len(BINS))
    for name, correlation in correlations.items():
        means = [correlation[(timesteps >= low) & (timesteps < high)].mean() for low, high in BINS]
        print(f"| {name} | " + " | ".join(f"{float(m):+.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
