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
"""Offline demo: preference-tune a toy text-to-image model with InPO and watch the preferred property rise.

    python demo.py                                  # reward: background brightness
    python demo.py --reward edge_sharpness

The toy model is the alignment benchmark's (benchmarks/assets/world_base_model: 32 px coloured shapes, an SD-layout
pipeline trained from scratch). The demo samples preference pairs from it, labels each pair by the reward, trains a
LoRA with `accelerate launch train_inpo.py` and its default settings, loads the LoRA with `load_lora_weights` and
compares samples before and after on the same seeds (benchmarks/run_alignment.py does the work). Writes to
--output_dir a before/after grid, a reward curve and a table. Nothing is downloaded.
"""

import argparse
import os
import shutil
import time


HERE = os.path.dirname(os.path.abspath(__file__))
WORLD_BASE_MODEL = os.path.join(HERE, "benchmarks", "assets", "world_base_model")


def run_alignment_demo(output_dir, reward, max_train_steps, num_pairs):
    """Preference-tune the shipped toy model toward `reward` with train_inpo.py's defaults; fall back to showing
    Diffusion-DPO beside it when the default does not raise the reward. Returns run_alignment's results."""
    from benchmarks import alignment_world as world
    from benchmarks import run_alignment

    base_dir = os.path.join(output_dir, "base_model")
    if not os.path.isdir(base_dir):
        shutil.copytree(WORLD_BASE_MODEL, base_dir)  # same fingerprint as BaseModelConfig(): loaded, not rebuilt
    argv = [
        "--out_dir",
        output_dir,
        "--reward",
        reward,
        "--methods",
        "default",
        "--num_pairs",
        str(num_pairs),
        "--num_inference_steps",
        "10",
        "--max_train_steps",
        str(max_train_steps),
        "--eval_every",
        str(max(1, max_train_steps // 2)),
        "--eval_seeds",
        "2",
        "--train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--beta_dpo",
        "5000",
    ]
    results = run_alignment.main(argv, model_config=world.BaseModelConfig())
    if results["default"]["rows"][-1]["mean_reward"] <= results["base"]["rows"][0]["mean_reward"]:
        print("The default InPO settings did NOT raise this reward; running Diffusion-DPO on the same pairs too.")
        argv.insert(argv.index("default") + 1, "diffusion_dpo")  # both in one table, plot and grid
        results = run_alignment.main(argv, model_config=world.BaseModelConfig())
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument(
        "--reward",
        default="background_brightness",
        help="What the preference labels prefer: background_brightness (a brighter background; no caption "
        "names it) or edge_sharpness (crisper shape edges).",
    )
    parser.add_argument("--max_train_steps", type=int, default=40)
    parser.add_argument("--num_pairs", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.time()
    results = run_alignment_demo(args.output_dir, args.reward, args.max_train_steps, args.num_pairs)
    base = results["base"]["rows"][0]
    print(f"\nReward `{args.reward}` of 24 samples (12 captions x 2 seeds, same seeds before and after):")
    for method in [m for m in results if m != "base"]:
        tuned = results[method]["rows"][-1]
        print(
            f"  {method}: reward {base['mean_reward']:.3f} -> {tuned['mean_reward']:.3f}, win rate vs base "
            f"{tuned['win_rate']:.2f} (ties 1/2), caption colour fidelity {base['fidelity']:.2f} -> {tuned['fidelity']:.2f}"
        )
    prefix = os.path.join(args.output_dir, f"alignment_{args.reward}_seed0")
    print(f"Before/after grid: {prefix}_grid.png, reward curve: {prefix}_reward.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
