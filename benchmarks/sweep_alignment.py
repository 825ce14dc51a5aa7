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
"""Sweep learning rate, β and LoRA rank for every method of the alignment benchmark, on its cached world.

    python benchmarks/sweep_alignment.py                              # the default grid (see SETTINGS)
    python benchmarks/sweep_alignment.py --settings 1e-4,1000,8 3e-4,5000,4 --methods inpo_grid

Reuses run_alignment.py's base model and pairs in --out_dir (building them first if they are missing), trains every
(method, setting) with train_inpo.py exactly as run_alignment.py does (200 steps unless told otherwise; any other
run_alignment.py flag works here too), and evaluates the checkpoints at steps 100 and 200 on 3 seeds per caption
rather than the benchmark's 8. A setting "collapses" when its fidelity drops well below the base model's at any
checkpoint. Finished runs are reused when the sweep is run again with the same flags, so settings can be added.

Writes --out_dir/sweep/sweep_table.md (rewritten as each run is scored; also printed) and sweep_results.json.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import alignment_world as world
from benchmarks import run_alignment


# (learning rate, β, LoRA rank): the old benchmark default (1e-3, 1000, 8) collapsed InPO, so the grid walks the
# learning rate down and β up from it, then tries other ranks at the chosen setting (3e-4, 1000).
SETTINGS = ["1e-4,1000,8", "3e-4,1000,8", "1e-3,1000,8", "1e-3,5000,8", "3e-4,1000,4", "3e-4,1000,16"]
DONE_FILE = "sweep_done.json"  # in a run folder: the command that trained it and its wall time
# Fidelity more than this below the base model's, at any checkpoint, marks a collapsed setting.
COLLAPSE_DROP = 0.15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="lr,β,rank triples.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="Trainings run at once, each on cpu_count / jobs threads: tiny models use one core better than two.",
    )
    known, rest = parser.parse_known_args(argv)
    # Every other flag (sizes, out_dir, methods, ...) means what it means to run_alignment.py.
    args = run_alignment.parse_args(["--max_train_steps", "200", "--eval_every", "100", "--eval_seeds", "3", *rest])
    args.settings = [parse_setting(s) for s in known.settings]
    args.jobs = known.jobs
    return args


def parse_setting(text):
    lr, beta, rank = text.split(",")
    return float(lr), float(beta), int(rank)


def setting_name(setting):
    lr, beta, rank = setting
    return f"lr{lr:g}_beta{beta:g}_rank{rank}"


def with_setting(args, setting):
    lr, beta, rank = setting
    return argparse.Namespace(**{**vars(args), "learning_rate": lr, "beta_dpo": beta, "rank": rank})


def train_once(args, method, base_dir, pairs_dir, run_dir):
    """`run_alignment.train`, skipped when `run_dir` holds a finished run of the same command; returns seconds.

    So a sweep rerun with more settings (or after an interruption) trains only what it lacks.
    """
    command = run_alignment.train_command(args, method, base_dir, pairs_dir, run_dir)
    record_path = os.path.join(run_dir, DONE_FILE)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == command:
            print(f"[{method}] reusing the finished run in {run_dir}", flush=True)
            return record["seconds"]
    seconds = run_alignment.train(args, method, base_dir, pairs_dir, run_dir)
    with open(record_path, "w") as f:
        json.dump({"command": command, "seconds": seconds}, f)
    return seconds


def run_all(args, base_dir, pairs_dir, evaluate):
    """Train every (setting, method), `args.jobs` at a time, and call evaluate(key, run_dir, seconds) as each
    finishes (in this thread: the pipeline is not thread-safe), so results arrive while the rest still train.
    """
    runs = {
        (setting, method): os.path.join(args.out_dir, "sweep", setting_name(setting), method)
        for setting in args.settings
        for method in args.methods
    }
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(train_once, with_setting(args, key[0]), key[1], base_dir, pairs_dir, run_dir): key
            for key, run_dir in runs.items()
        }
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            evaluate(key, runs[key], future.result())


def summarise(rows, base_fidelity):
    final = rows[-1]
    return {
        "final_reward": final["mean_reward"],
        "final_win_rate": final["win_rate"],
        "final_fidelity": final["fidelity"],
        "min_fidelity": min(r["fidelity"] for r in rows),
        "collapsed": min(r["fidelity"] for r in rows) < base_fidelity - COLLAPSE_DROP,
    }


def markdown_table(args, base_row, summaries, seconds):
    lines = [
        f"# Sweep: reward `{args.reward}`, {args.max_train_steps} steps, batch {args.train_batch_size}, "
        f"{args.eval_seeds} evaluation seeds per caption",
        "",
        f"Base model: mean reward {base_row['mean_reward']:.4f}, fidelity {base_row['fidelity']:.3f}. Collapsed: "
        f"fidelity below base − {COLLAPSE_DROP} at any checkpoint (every {args.eval_every} steps). Trainings ran "
        f"{args.jobs} at a time.",
        "",
        "| method | lr | β | rank | final reward | win rate | final fidelity | min fidelity | collapsed | "
        "train wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (setting, method), s in summaries.items():
        lr, beta, rank = setting
        lines.append(
            f"| {method} | {lr:g} | {beta:g} | {rank} | {s['final_reward']:.4f} | {s['final_win_rate']:.3f} "
            f"| {s['final_fidelity']:.3f} | {s['min_fidelity']:.3f} | {'yes' if s['collapsed'] else 'no'} "
            f"| {seconds[(setting, method)]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def share_cores(jobs):
    """Give each training, and this process's evaluations, cpu_count / jobs threads: more threads than cores make
    tiny models many times slower (threads spin waiting for each other)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by `accelerate launch` for the trainings
    torch.set_num_threads(threads)


def main(argv=None):
    args = parse_args(argv)
    share_cores(args.jobs)
    start = time.time()
    pipe, _, _, (base_dir, pairs_dir) = run_alignment.prepare_world(args)
    captions, seeds = world.eval_prompts(args.eval_seeds)
    base = world.evaluate(pipe, captions, seeds, **run_alignment.sampling_kwargs(args))
    base_row = run_alignment.score(base, base["rewards"])
    sweep_dir = os.path.join(args.out_dir, "sweep")
    summaries, seconds, all_rows = {}, {}, {}

    def evaluate(key, run_dir, train_seconds):
        """Score one finished run and rewrite the table, so an interrupted sweep still leaves its results."""
        setting, method = key
        rows, _ = run_alignment.evaluate_method(
            pipe, with_setting(args, setting), run_dir, captions, seeds, base["rewards"]
        )
        summaries[key], seconds[key] = summarise(rows, base_row["fidelity"]), train_seconds
        all_rows[f"{setting_name(setting)}/{method}"] = rows

        def order(k):
            return (args.settings.index(k[0]), args.methods.index(k[1]))

        ordered = {k: summaries[k] for k in sorted(summaries, key=order)}
        with open(os.path.join(sweep_dir, "sweep_table.md"), "w") as f:
            f.write(markdown_table(args, base_row, ordered, seconds))
        with open(os.path.join(sweep_dir, "sweep_results.json"), "w") as f:
            json.dump(
                {
                    "args": {**vars(args), "settings": [setting_name(s) for s in args.settings]},
                    "base": base_row,
                    "rows": all_rows,
                    "seconds_so_far": round(time.time() - start, 1),
                },
                f,
                indent=2,
            )

    run_all(args, base_dir, pairs_dir, evaluate)
    with open(os.path.join(sweep_dir, "sweep_table.md")) as f:
        print(f.read())
    print(f"Sweep done in {time.time() - start:.0f} s; wrote {sweep_dir}/sweep_table.md and sweep_results.json")


if __name__ == "__main__":
    main()
