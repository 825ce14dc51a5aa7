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
r"""Score finished alignment runs again on more, fresh evaluation seeds: a tighter estimate of reward and fidelity.

    python benchmarks/reevaluate.py --out_dir benchmarks/out --reward background_brightness \
        --eval_seeds 16 --first_seed 100 RUN_DIR [RUN_DIR ...]

run_alignment.py evaluates on 12 captions × 4 seeds (48 images), where one image moves fidelity by 0.02. This loads
each run's final LoRA (RUN_DIR: a run's output folder, e.g. OUT_DIR/runs/<reward>/<method>_seed<seed>) into the
base model of OUT_DIR and samples 12 captions × --eval_seeds seeds starting at --first_seed (seeds the 4-seed
evaluation never used). Prints a markdown table: reward gain over the base model on the same seeds, win rate,
fidelity, background roughness.
"""

import argparse
import os
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import alignment_world as world  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument(
        "--out_dir",
        default=os.path.join(REPO_ROOT, "benchmarks", "out"),
        help="run_alignment.py's --out_dir (its base_model is loaded); run_alignment.py's default, benchmarks/out.",
    )
    parser.add_argument("--reward", choices=sorted(world.REWARDS), default=world.DEFAULT_REWARD)
    parser.add_argument("--eval_seeds", type=int, default=16)
    parser.add_argument("--first_seed", type=int, default=100)
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    pipe = world.load_pipeline(os.path.join(args.out_dir, "base_model"))
    captions, seeds = world.eval_prompts(args.eval_seeds)
    seeds = [seed + args.first_seed for seed in seeds]
    sampling = {
        "reward_name": args.reward,
        "num_inference_steps": world.NUM_INFERENCE_STEPS,
        "guidance_scale": world.GUIDANCE_SCALE,
    }
    base = world.evaluate(pipe, captions, seeds, **sampling)
    lines = [
        f"Reward `{args.reward}`, {len(captions)} images (seeds {args.first_seed}–{args.first_seed + args.eval_seeds - 1}"
        f" per caption); base: reward {base['mean_reward']:.3f}, fidelity {base['fidelity']:.3f}, roughness ×1000 "
        f"{1000 * base['quality']:.2f}.",
        "",
        "| run | reward gain | win rate | fidelity | roughness ×1000 |",
        "|---|---:|---:|---:|---:|",
    ]
    for run_dir in args.run_dirs:
        result = world.evaluate_lora(pipe, run_dir, captions, seeds, **sampling)
        lines.append(
            f"| {os.path.relpath(run_dir, args.out_dir)} | {result['mean_reward'] - base['mean_reward']:+.3f} | "
            f"{world.win_rate(result['rewards'], base['rewards']):.2f} | {result['fidelity']:.3f} | "
            f"{1000 * result['quality']:.2f} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
