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
"""Why does the default's lead over Diffusion-DPO depend on the world? What each world's first gradient looks like.

    python benchmarks/diagnose_suite.py [--out_dir benchmarks/out/suite]     # after run_suite.py built the worlds

At the start of training (LoRA up weights zero, so policy = reference) the preference loss's gradient is, up to a
constant, g = ∇θ (e_w − e_l): the policy's error on the preferred image minus that on the rejected one. How fast a
method can learn per step is bounded by how consistent that gradient is across the pairs and noise draws it
sees: this script measures it for each latent source on each world's own base model and pairs, with the same
timesteps and fresh noise for every source, and prints

- per world: the pairs' reward gaps, the base model's noise-prediction error, and its reward at guidance 1 and 5;
- per world and latent source: the gradient's signal-to-noise ratio for a batch of 8 pairs (‖E g‖² against the
  variance of a batch mean), the cosine between the mean gradients of two disjoint halves of the pairs (does the
  direction reproduce), the share of the variance that comes from the noise draw rather than from which pair it is,
  and the SNR in three timestep ranges (where inverted noise helps and where fresh noise does).
"""

import argparse
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inpo_utils
from benchmarks import alignment_world as world
from benchmarks import run_alignment


# Latent source (named as benchmarks/run_alignment.py's methods) -> source_latents keywords; the inverted noise is the
# reference's whole-grid inversion with K = 5, as the default's.
SOURCES = {
    "diffusion_dpo": {"latent_source": "forward"},
    "inverted_noise_mix50_k5": {"latent_source": "inverted_noise", "fresh_noise_mix": 0.5},
    "inverted_noise_mix90_k5": {"latent_source": "inverted_noise", "fresh_noise_mix": 0.9},
    "inverted_noise_mix50_k5_shared": {
        "latent_source": "inverted_noise",
        "fresh_noise_mix": 0.5,
        "share_inverted_noise": True,
    },
    "inverted_noise_only": {"latent_source": "inverted_noise", "fresh_noise_mix": 0.0},
}
TIMESTEP_RANGES = ((0, 333), (333, 666), (666, 1000))
BATCH_PAIRS = 8
INVERSION_STEPS = 5


def load_pairs(pairs_dir, num_pairs):
    """(captions, preferred, rejected): uint8 images (N, S, S, 3) of the first `num_pairs` untied pairs."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(pairs_dir, "train-00000-of-00001.parquet")).to_pylist()
    captions, preferred, rejected = [], [], []
    for row in table:
        if row["label_0"] == 0.5:
            continue
        images = [np.asarray(Image.open(io.BytesIO(row[key])).convert("RGB")) for key in ("jpg_0", "jpg_1")]
        winner = 0 if row["label_0"] == 1 else 1
        captions.append(row["caption"])
        preferred.append(images[winner])
        rejected.append(images[1 - winner])
        if len(captions) == num_pairs:
            break
    return captions, np.stack(preferred), np.stack(rejected)


@torch.no_grad()
def encode(pipe, captions, preferred, rejected):
    """x0 (2N, 4, 16, 16) winners first (the VAE's posterior means, scaled) and text states (2N, L, D)."""
    pixels = world._to_model_range(np.concatenate([preferred, rejected]))
    x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer(
        captions + captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return x0, pipe.text_encoder(ids)[0]


def lora_unet(pipe, rank=8):
    """The pipeline's UNet with train_inpo.py's LoRA (gaussian init: up weights zero), only the LoRA trainable."""
    from peft import LoraConfig

    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    return unet, [p for p in unet.parameters() if p.requires_grad]


def pair_gradients(unet, params, x0, states, scheduler, inverted, draws, source):
    """Flattened ∇θ (e_w − e_l) (P·D, n_params) for every pair and draw, and the draws' timesteps (P·D,)."""
    alphas_cumprod = scheduler.alphas_cumprod
    num_pairs = len(x0) // 2
    gradients = []
    for pair in range(num_pairs):
        rows = torch.tensor([pair, pair + num_pairs])
        for timestep, fresh in draws[pair]:
            t = torch.full((2,), timestep)
            if source["latent_source"] == "forward":
                noise = fresh
            else:
                noise = inverted[rows]
                if source.get("share_inverted_noise"):
                    noise = inpo_utils.share_within_pairs(noise)
                if source["fresh_noise_mix"] > 0:
                    noise = inpo_utils.mix_fresh_noise(noise, fresh, source["fresh_noise_mix"])
            latents = inpo_utils.forward_noised(x0[rows], noise, t, alphas_cumprod)
            errors = inpo_utils.per_sample_mse(unet(latents, t, states[rows]).sample, noise)
            grads = torch.autograd.grad(errors[0] - errors[1], params)
            gradients.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(gradients).double()


def gradient_statistics(gradients, timesteps, num_pairs, draws_per_pair):
    """SNR of a batch of BATCH_PAIRS pairs (one draw each), half-split cosine, draw share of variance, SNR by t.

    The SNR is ‖μ‖² / (tr Σ / BATCH_PAIRS) with μ, Σ the mean and covariance of one (pair, draw) gradient; ‖μ‖² is
    estimated without the bias of a finite sample (‖mean‖² − tr Σ_mean), so a direction that is all noise scores ~0.
    """

    def snr(per_unit, samples):
        """per_unit (U, n) independent units whose mean estimates μ; samples (M, n) single gradients for Σ."""
        mean = per_unit.mean(0)
        mean_variance = ((per_unit - mean) ** 2).sum(1).sum() / (len(per_unit) - 1) / len(per_unit)
        variance = ((samples - samples.mean(0)) ** 2).sum(1).sum() / (len(samples) - 1)
        return float((mean @ mean - mean_variance) / (variance / BATCH_PAIRS))

    by_pair = gradients.view(num_pairs, draws_per_pair, -1)
    half = num_pairs // 2
    first, second = by_pair[:half].mean((0, 1)), by_pair[half:].mean((0, 1))
    cosine = float(first @ second / (first.norm() * second.norm()))
    total = ((gradients - gradients.mean(0)) ** 2).sum(1).mean()
    within = ((by_pair - by_pair.mean(1, keepdim=True)) ** 2).sum(2).mean() * draws_per_pair / (draws_per_pair - 1)
    by_range = {}
    for low, high in TIMESTEP_RANGES:
        selected = gradients[(timesteps >= low) & (timesteps < high)]
        by_range[f"{low}-{high}"] = snr(selected, selected) if len(selected) > 2 else None
    return {
        "snr": snr(by_pair.mean(1), gradients),
        "half_cosine": cosine,
        "draw_share": float(within / total),
        "snr_by_t": by_range,
    }


@torch.no_grad()
def base_errors(unet, x0, states, scheduler, generator):
    """The reference's mean ε-prediction error on the pair images per timestep range (fresh noise)."""
    errors = {}
    for low, high in TIMESTEP_RANGES:
        t = torch.randint(low, high, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        latents = inpo_utils.forward_noised(x0, noise, t, scheduler.alphas_cumprod)
        errors[f"{low}-{high}"] = float(inpo_utils.per_sample_mse(unet(latents, t, states).sample, noise).mean())
    return errors


def diagnose_world(args, world_name):
    folder = os.path.join(args.out_dir, world_name)
    reward = world.WORLDS[world_name].reward
    pipe = world.load_pipeline(os.path.join(folder, "base_model"))
    captions, preferred, rejected = load_pairs(os.path.join(folder, "pairs", reward), args.num_pairs)
    x0, states = encode(pipe, captions, preferred, rejected)
    generator = torch.Generator().manual_seed(0)
    inverse = inpo_utils.make_inverse_scheduler(pipe.scheduler.config, INVERSION_STEPS)
    errors = base_errors(pipe.unet, x0, states, inverse, generator)
    with torch.no_grad():
        inverted = inpo_utils.inverted_noise(pipe.unet, x0, states, inverse)
    # The same (t, fresh noise shared by the pair) draws for every source, as Diffusion-DPO draws them.
    draws = [
        [
            (
                int(torch.randint(0, 1000, (1,), generator=generator)),
                torch.randn(x0[:1].shape, generator=generator).repeat(2, 1, 1, 1),
            )
            for _ in range(args.draws_per_pair)
        ]
        for _ in range(len(captions))
    ]
    timesteps = torch.tensor([t for pair in draws for t, _ in pair])
    unet, params = lora_unet(pipe)
    sources = {}
    for name, source in SOURCES.items():
        gradients = pair_gradients(unet, params, x0, states, inverse, inverted, draws, source)
        sources[name] = gradient_statistics(gradients, timesteps, len(captions), args.draws_per_pair)
        print(f"[{world_name}] {name}: {json.dumps(sources[name])}", flush=True)
    rewards_w = world.reward_of(reward, preferred / 255.0, captions)
    rewards_l = world.reward_of(reward, rejected / 255.0, captions)
    gaps = rewards_w - rewards_l
    spread = np.concatenate([rewards_w, rewards_l]).std()
    return {
        "pairs": len(captions),
        "mean_gap": float(gaps.mean()),
        "gap_over_reward_std": float(gaps.mean() / spread),
        "base_error": errors,
        "base_reward_by_guidance": base_reward_by_guidance(folder, reward),
        "sources": sources,
    }


def base_reward_by_guidance(folder, reward):
    """{guidance: the base model's mean reward} from the suite's results, if one has run."""
    path = os.path.join(folder, f"alignment_{reward}_seed0_diffusion_dpo_results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        base = json.load(f)["results"]["base"]
    found = {str(world.GUIDANCE_SCALE): base["rows"][0]["mean_reward"]}
    found.update({scale: row["mean_reward"] for scale, row in base.get("final_at_guidance", {}).items()})
    return found


def markdown(diagnoses):
    lines = [
        "| world | pairs' mean gap / reward std | base ε error, t < 333 / 333–666 / > 666 | "
        "base reward at guidance 1 / 5 |",
        "|---|---:|---:|---:|",
    ]
    for name, d in diagnoses.items():
        by_guidance = d["base_reward_by_guidance"]
        guidance = " / ".join(f"{by_guidance[k]:.3f}" for k in ("1.0", "5.0") if k in by_guidance) or "–"
        errors = " / ".join(f"{v:.3f}" for v in d["base_error"].values())
        lines.append(f"| {name} | {d['gap_over_reward_std']:.2f} | {errors} | {guidance} |")
    lines += [
        "",
        f"| world | latent source | gradient SNR (batch of {BATCH_PAIRS}) | half-split cosine | "
        "variance from the draw | SNR at t < 333 / 333–666 / > 666 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, d in diagnoses.items():
        for source, s in d["sources"].items():
            by_t = " / ".join("–" if v is None else f"{v:.3f}" for v in s["snr_by_t"].values())
            lines.append(
                f"| {name} | {source} | {s['snr']:.3f} | {s['half_cosine']:.2f} | {s['draw_share']:.2f} | {by_t} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(run_alignment.REPO_ROOT, "benchmarks", "out", "suite"))
    # DDPM worlds only: the diagnostic reads the DDIM schedule.
    ddpm_worlds = [name for name, spec in world.WORLDS.items() if spec.config.family == "sd"]
    parser.add_argument("--worlds", nargs="+", choices=sorted(ddpm_worlds), default=ddpm_worlds)
    parser.add_argument("--num_pairs", type=int, default=256)
    parser.add_argument("--draws_per_pair", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    diagnoses = {name: diagnose_world(args, name) for name in args.worlds}
    table = markdown(diagnoses)
    print(table)
    with open(os.path.join(args.out_dir, "diagnosis.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "diagnosis.json"), "w") as f:
        json.dump(diagnoses, f, indent=1)
    return diagnoses


if __name__ == "__main__":
    main()
