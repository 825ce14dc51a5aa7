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
"""The alignment suite: every world of alignment_world.WORLDS × every method × 3 seeds, each with its control.

    python benchmarks/run_suite.py                  # resumable; prints the table, writes OUT_DIR/suite_*
    python benchmarks/run_suite.py --summarize      # the table and plot of the runs already in OUT_DIR
    python benchmarks/run_suite.py --quick          # every stage on tiny sizes (the numbers mean nothing)

Builds each world's base model and its pairs (cached by fingerprint under OUT_DIR/<world>; the shapes world's base
model is copied from benchmarks/assets), then runs benchmarks/run_alignment.py once per (world, method, seed,
labels), two at a time with one thread each, skipping every run whose results file exists: an interrupted suite is
resumed by running the command again. Every run trains with the same flags (β 5000, lr 1e-3, batch 8, LoRA rank 8,
100 steps) on 512 pairs and is evaluated at every 50 steps on 48 samples at guidance 5, its final LoRA also at
guidance 1.

The table has, per world and method, over the seeds: the reward gain over the base model after 100 steps, the
flipped-label control's gain (an aligning method's is not positive), fidelity and background roughness against the
base model's, training seconds (the logged optimizer steps, plus the cache's precompute for the cached method), and
gain per 100 steps and per 100 training seconds as multiples of Diffusion-DPO's on the same world; then each
method's worst case over the worlds.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import alignment_world as world
from benchmarks import run_alignment
from benchmarks.summarize_alignment import mean_std


ASSET = os.path.join(run_alignment.REPO_ROOT, "benchmarks", "assets", "world_base_model")
# Pinned flags (run_alignment.METHODS), so that a table does not change meaning with train_inpo.py's defaults: the
# default at fresh-noise mix 0.5 and at 0.9, each online and from the cache, the pair-shared inverted noise, the
# paper's InPO and Diffusion-DPO.
METHODS = [
    "diffusion_dpo",
    "inpo_grid",
    "inverted_noise_mix50_k5",
    "inverted_noise_mix90_k5",
    "inverted_noise_mix50_k5_shared",
    "inverted_noise_mix50_cached_k5",
    "inverted_noise_mix90_cached_k5",
]
# On the flow-matching (SD3) world: Diffusion-DPO and the default, online and from the cache. train_inpo_sd3.py has
# no paper's InPO (its DDIM inversion by the policy), and the variants the SD worlds settled are not run again.
FLOW_MATCHING_METHODS = ["diffusion_dpo", "inverted_noise_mix90_k5", "inverted_noise_mix90_cached_k5"]
REFERENCE_METHOD = "diffusion_dpo"
SEEDS = [0, 1, 2]
COMMON = [
    *["--learning_rate", "1e-3", "--beta_dpo", "5000", "--train_batch_size", "8", "--rank", "8"],
    *["--num_pairs", "512", "--max_train_steps", "100", "--eval_every", "50", "--eval_seeds", "4"],
    *["--base_seed", "0", "--final_guidance_scales", "1"],
]
QUICK_SEEDS = [0]
# Fidelity may fall by this much before a method counts as not keeping it: about two standard errors of the
# difference between a 3-seed mean and the base model's one estimate, each of 48 samples at a fidelity near 0.9.
MAX_FIDELITY_DROP = 0.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(run_alignment.REPO_ROOT, "benchmarks", "out", "suite"))
    parser.add_argument("--worlds", nargs="+", choices=sorted(world.WORLDS), default=list(world.WORLDS))
    parser.add_argument("--methods", nargs="+", choices=sorted(run_alignment.METHODS), default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"Default: {SEEDS} ({QUICK_SEEDS} quick).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time.")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads per run. Default: cores / jobs.")
    parser.add_argument("--quick", action="store_true", help="run_alignment.py --quick sizes; OUT_DIR/quick.")
    parser.add_argument("--summarize", action="store_true", help="Only the table and plot of finished runs.")
    parser.add_argument("--prepare", action="store_true", help="Only build the worlds' base models and pairs.")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    if args.quick:
        args.out_dir = os.path.join(args.out_dir, "quick")
    return args


def methods_of(args, world_name):
    """The methods of --methods that run on `world_name` (all of them, but FLOW_MATCHING_METHODS on an SD3 world)."""
    if world.WORLDS[world_name].config.family == "sd3":
        return [method for method in args.methods if method in FLOW_MATCHING_METHODS]
    return list(args.methods)


def run_argv(args, world_name, method, seed, flipped):
    """run_alignment.py's arguments for one run; its results land in results_path(...) of the same values."""
    return [
        *COMMON,
        *["--world", world_name, "--out_dir", os.path.join(args.out_dir, world_name)],
        *["--methods", method, "--seed", str(seed), "--results_tag", method],
        *(["--flipped_labels"] if flipped else []),
        *(["--quick"] if args.quick else []),
    ]


def world_dir(args, world_name):
    """Where run_alignment.py keeps this world's model, pairs and results (--quick appends /quick itself)."""
    return os.path.join(args.out_dir, world_name, "quick") if args.quick else os.path.join(args.out_dir, world_name)


def results_path(args, world_name, method, seed, flipped):
    reward = world.WORLDS[world_name].reward + ("_flipped" if flipped else "")
    return os.path.join(world_dir(args, world_name), f"alignment_{reward}_seed{seed}_{method}_results.json")


def prepare(args, world_name):
    """Build the world's base model and both pair sets (true and flipped labels), so that parallel runs only read."""
    folder = world_dir(args, world_name)
    base_dir = os.path.join(folder, "base_model")
    if world_name == world.DEFAULT_WORLD and not args.quick and not os.path.isdir(base_dir):
        shutil.copytree(ASSET, base_dir)  # the same fingerprint: loaded, not rebuilt
    for flipped in (False, True):
        argv = run_argv(args, world_name, "default", 0, flipped)
        run_alignment.prepare_world(run_alignment.parse_args(argv))
    return world_name


def run_suite(args):
    """Prepare every world, then run everything not yet finished, `--jobs` subprocesses at a time.

    A world's runs start as soon as its base model and pairs are ready, while other worlds are still being built;
    the runs go seed by seed (every world, method and control of seed 0 first), so a comparable set arrives early.
    """
    start = time.time()
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    logs = os.path.join(args.out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    script = os.path.abspath(__file__)
    # (label, world whose preparation it waits for or None, command)
    pending = [(name, None, [sys.executable, script, "--prepare", *world_flags(args, name)]) for name in args.worlds]
    for seed in args.seeds:
        for name in args.worlds:
            for method in methods_of(args, name):
                for flipped in (False, True):
                    if not os.path.exists(results_path(args, name, method, seed, flipped)):
                        label = f"{name}_{method}_seed{seed}{'_flipped' if flipped else ''}"
                        command = [
                            sys.executable,
                            run_alignment.__file__,
                            *run_argv(args, name, method, seed, flipped),
                        ]
                        pending.append((label, name, command))
    print(f"{len(args.worlds)} worlds to prepare, {len(pending) - len(args.worlds)} runs to do", flush=True)
    ready, running, failed = set(), {}, []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while pending or running:
        for label, (process, waits_for) in list(running.items()):
            if process.poll() is None:
                continue
            del running[label]
            if process.returncode == 0:
                ready.add(label)
            else:
                failed.append(label)
                if waits_for is None:  # a world that failed to build: its runs cannot start
                    pending = [task for task in pending if task[1] != label]
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"[{label}] {status} ({time.time() - start:.0f} s)", flush=True)
        startable = [task for task in pending if task[1] is None or task[1] in ready]
        while startable and len(running) < args.jobs:
            task = startable.pop(0)
            pending.remove(task)
            label, waits_for, command = task
            with open(os.path.join(logs, f"{label}.log"), "w") as log:
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[label] = (process, waits_for)
        time.sleep(1)
    if failed:
        raise SystemExit(f"{len(failed)} tasks failed: {failed}; their logs are in {logs}.")


def world_flags(args, world_name):
    """run_suite.py flags that make a --prepare subprocess build `world_name` where this suite keeps it."""
    out_dir = os.path.dirname(args.out_dir) if args.quick else args.out_dir  # --quick appends /quick again
    return ["--out_dir", out_dir, "--worlds", world_name, *(["--quick"] if args.quick else [])]


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


def load_runs(args, world_name):
    """{(method, seed, flipped): run_alignment results of that method (rows, seconds, ...), plus "base"}."""
    runs = {}
    pattern = os.path.join(world_dir(args, world_name), "alignment_*_results.json")
    for path in glob.glob(pattern):
        with open(path) as f:
            run = json.load(f)
        flipped, seed = run["args"]["flipped_labels"], run["args"]["seed"]
        for method, result in run["results"].items():
            if method != "base":
                runs[(method, seed, flipped)] = {**result, "base": run["results"]["base"]}
    return runs


def gains_of(run):
    """[(step, gain over the base model)], the base model at step 0."""
    base = run["base"]["rows"][0]["mean_reward"]
    return [(0, 0.0)] + [(row["step"], row["mean_reward"] - base) for row in run["rows"]]


def summarize_world(args, world_name):
    """{method: summary over seeds} of one world (methods with at least one finished seed and its control)."""
    runs = load_runs(args, world_name)
    summary = {}
    for method in methods_of(args, world_name):
        seeds = [s for s in args.seeds if (method, s, False) in runs and (method, s, True) in runs]
        if not seeds:
            continue
        true, flipped = [runs[(method, s, False)] for s in seeds], [runs[(method, s, True)] for s in seeds]
        base = true[0]["base"]
        final = [run["rows"][-1] for run in true]
        seconds = [run["step_seconds"] + run["precompute_seconds"] for run in true]
        at_one = [run.get("final_at_guidance", {}).get("1.0") for run in true]
        base_at_one = base.get("final_at_guidance", {}).get("1.0")
        summary[method] = {
            "seeds": seeds,
            "steps": true[0]["rows"][-1]["step"],
            "gain": mean_std(gains_of(run)[-1][1] for run in true),
            "gain_per_seed": [gains_of(run)[-1][1] for run in true],
            "control_gain": mean_std(gains_of(run)[-1][1] for run in flipped),
            "control_per_seed": [gains_of(run)[-1][1] for run in flipped],
            "win_rate": mean_std(row["win_rate"] for row in final),
            "fidelity": mean_std(row["fidelity"] for row in final),
            "base_fidelity": base["rows"][0]["fidelity"],
            "quality": mean_std(row["quality"] for row in final),
            "base_quality": base["rows"][0]["quality"],
            "seconds": mean_std(seconds),
            "precompute_seconds": mean_std(run["precompute_seconds"] for run in true)[0],
            "gain_at_guidance_1": (
                mean_std(r["mean_reward"] - base_at_one["mean_reward"] for r in at_one)
                if base_at_one and all(at_one)
                else None
            ),
            "curves": [gains_of(run) for run in true],
            "control_curves": [gains_of(run) for run in flipped],
            "seconds_per_run": seconds,
        }
    reference = summary.get(REFERENCE_METHOD)
    for result in summary.values():
        gain, seconds = result["gain"][0], result["seconds"][0]
        if reference and reference["gain"][0] > 0:
            result["per_step_vs_dpo"] = gain / reference["gain"][0]
            result["per_second_vs_dpo"] = (gain / seconds) / (reference["gain"][0] / reference["seconds"][0])
        else:
            result["per_step_vs_dpo"] = result["per_second_vs_dpo"] = None
        result["aligns"] = min(result["gain_per_seed"]) > 0 and result["control_gain"][0] <= 0
        result["keeps_fidelity"] = result["fidelity"][0] >= result["base_fidelity"] - MAX_FIDELITY_DROP
    return summary


def _mean_sd(value):
    mean, sd = value
    return f"{mean:+.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def _ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def world_table(args, names):
    """The worlds: what each is, how good its base model is and how far apart its pairs are."""
    lines = [
        "| world | what it is | base fidelity (guidance 5) | base reward (std) | pairs' mean reward gap | build s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in names:
        folder = world_dir(args, name)
        spec = world.WORLDS[name]
        with open(os.path.join(folder, "base_model", world.META_FILE)) as f:
            base = json.load(f)
        with open(os.path.join(folder, "pairs", spec.reward, world.META_FILE)) as f:
            pairs = json.load(f)
        runs = load_runs(args, name)
        base_row = next(iter(runs.values()))["base"]["rows"][0] if runs else None
        reward = f"{base_row['mean_reward']:.3f} ({pairs['reward_std']:.3f})" if base_row else "–"
        fidelity = f"{base_row['fidelity']:.3f}" if base_row else "–"
        lines.append(
            f"| {name} | {spec.description} | {fidelity} | {reward} | {pairs['mean_reward_gap']:.3f} | "
            f"{base['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(args, summaries):
    steps = next(iter(next(iter(summaries.values())).values()))["steps"]
    lines = [
        f"| world | method | gain after {steps} steps | control (flipped labels) | win rate | fidelity (base) | "
        "roughness (base) | training s | gain / step vs DPO | gain / s vs DPO | gain at guidance 1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world_name, summary in summaries.items():
        for method, r in summary.items():
            at_one = r["gain_at_guidance_1"]
            lines.append(
                f"| {world_name} | {method} | {_mean_sd(r['gain'])} | {_mean_sd(r['control_gain'])} | "
                f"{r['win_rate'][0]:.2f} | {r['fidelity'][0]:.3f} ({r['base_fidelity']:.3f}) | "
                f"{r['quality'][0]:.4f} ({r['base_quality']:.4f}) | "
                f"{r['seconds'][0]:.0f} | {_ratio(r['per_step_vs_dpo'])} | {_ratio(r['per_second_vs_dpo'])} | "
                + ("–" if at_one is None else f"{at_one[0]:+.3f}")
                + " |"
            )
    lines += [
        "",
        "Worst case over the worlds (a method qualifies when every seed gains, the mean control does not, and "
        f"fidelity falls by at most {MAX_FIDELITY_DROP} on every world):",
        "",
        "| method | worlds | qualifies | worst gain / step vs DPO | worst gain / s vs DPO |",
        "|---|---:|---|---:|---:|",
    ]
    for method in args.methods:
        rows = [s[method] for s in summaries.values() if method in s]
        if not rows:
            continue
        qualifies = all(r["aligns"] and r["keeps_fidelity"] for r in rows)
        per_step = [r["per_step_vs_dpo"] for r in rows if r["per_step_vs_dpo"] is not None]
        per_second = [r["per_second_vs_dpo"] for r in rows if r["per_second_vs_dpo"] is not None]
        lines.append(
            f"| {method} | {len(rows)} | {'yes' if qualifies else 'no'} | "
            f"{_ratio(min(per_step) if per_step else None)} | {_ratio(min(per_second) if per_second else None)} |"
        )
    return "\n".join(lines) + "\n"


def plot(summaries, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summaries), figsize=(4.2 * len(summaries), 7), squeeze=False)
    for col, (world_name, summary) in enumerate(summaries.items()):
        for index, (method, r) in enumerate(summary.items()):
            colour = f"C{index}"
            steps = [step for step, _ in r["curves"][0]]
            mean = [sum(c[i][1] for c in r["curves"]) / len(r["curves"]) for i in range(len(steps))]
            control = [sum(c[i][1] for c in r["control_curves"]) / len(r["control_curves"]) for i in range(len(steps))]
            # Training seconds at a checkpoint: the precompute (no gain yet), then the steps at the mean step time.
            step_seconds = (r["seconds"][0] - r["precompute_seconds"]) / max(steps[-1], 1)
            seconds = [r["precompute_seconds"] + step * step_seconds for step in steps]
            axes[0, col].plot(steps, mean, marker="o", color=colour, label=method)
            axes[0, col].plot(steps, control, linestyle="--", color=colour, alpha=0.5)
            axes[1, col].plot([0.0, *seconds], [0.0, *mean], marker="o", color=colour, label=method)
        axes[0, col].set(title=world_name, xlabel="optimizer step", ylabel="reward gain (dashed: control)")
        axes[1, col].set(xlabel="training seconds", ylabel="reward gain")
        for ax in axes[:, col]:
            ax.axhline(0, color="grey", linewidth=0.8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args):
    summaries = {name: summarize_world(args, name) for name in args.worlds}
    summaries = {name: s for name, s in summaries.items() if s}
    if not summaries:
        raise SystemExit(f"No finished runs under {args.out_dir}; run the suite first.")
    table = world_table(args, list(summaries)) + "\n" + markdown(args, summaries)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "suite_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "suite_results.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    plot(summaries, os.path.join(args.out_dir, "suite_reward.png"))
    print(f"Wrote {args.out_dir}/suite_{{table.md,results.json,reward.png}}")
    return summaries


def main(argv=None):
    args = parse_args(argv)
    if args.prepare:
        for name in args.worlds:
            prepare(args, name)
        return None
    if not args.summarize:
        run_suite(args)
    return summarize(args)


if __name__ == "__main__":
    main()
