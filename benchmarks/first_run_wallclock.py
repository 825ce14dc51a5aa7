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
"""First-run wall clock on the alignment world: the invert-once cache (precompute + training) against Diffusion-DPO.

    OMP_NUM_THREADS=1 python benchmarks/first_run_wallclock.py --learning_rate 1e-3 --beta_dpo 5000

Takes run_alignment.py's flags (same world, pairs and training settings; pass the same --out_dir to reuse its base
model and pairs) and times, back to back on the same cores, each as its own `train_inpo.py` process with start-up:
Diffusion-DPO for --dpo_steps, then for each --cache_inversion_steps K the cache precompute in the scripts' default
layout and training from it for each of --cached_steps. It trains no new rewards: which step count reaches which gain
comes from run_alignment.py's runs. Prints a markdown table and writes it to OUT_DIR/first_run_wallclock.md.
"""

import argparse
import copy
import os
import shutil
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import run_alignment  # noqa: E402


def timed(command, log_path):
    started = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=run_alignment.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:8])} ... failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dpo_steps", type=int, default=200)
    parser.add_argument("--cached_steps", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--cache_inversion_steps", type=int, nargs="+", default=[10, 5])
    own, rest = parser.parse_known_args(argv)
    args = run_alignment.parse_args(rest)
    _, _, _, (base_dir, pairs_dir) = run_alignment.prepare_world(args)
    work = os.path.join(args.out_dir, "first_run_wallclock")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    def command(method, steps, run_dir, *extra):
        settings = copy.copy(args)
        settings.max_train_steps = steps
        return [*run_alignment.train_command(settings, method, base_dir, pairs_dir, run_dir), *map(str, extra)]

    rows = []
    dpo_dir = os.path.join(work, "dpo")
    dpo_seconds = timed(command("diffusion_dpo", own.dpo_steps, dpo_dir), dpo_dir + ".log")
    rows.append((f"Diffusion-DPO, {own.dpo_steps} steps", "–", f"{dpo_seconds:.0f}", dpo_seconds))
    print(rows[-1], flush=True)
    for k in own.cache_inversion_steps:
        cache = ["--inversion_cache_dir", os.path.join(work, f"cache_k{k}"), "--inversion_steps", k]
        run_dir = os.path.join(work, f"precompute_k{k}")
        precompute = timed(
            command("inverted_noise_mix50_cached", 1, run_dir, *cache, "--precompute_inversion_cache"),
            run_dir + ".log",
        )
        for steps in own.cached_steps:
            run_dir = os.path.join(work, f"cached_k{k}_{steps}")
            train = timed(command("inverted_noise_mix50_cached", steps, run_dir, *cache), run_dir + ".log")
            rows.append((f"cached, K = {k}, {steps} steps", f"{precompute:.0f}", f"{train:.0f}", precompute + train))
            print(rows[-1], flush=True)

    lines = [
        f"{args.num_pairs} pairs, batch {args.train_batch_size}, LoRA rank {args.rank}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPU cores; each part a separate process "
        "(start-up included).",
        "",
        "| run | precompute s | training s | first run s | × Diffusion-DPO |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {pre} | {train} | {total:.0f} | {total / dpo_seconds:.2f} |" for name, pre, train, total in rows
    ]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out_dir, "first_run_wallclock.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
