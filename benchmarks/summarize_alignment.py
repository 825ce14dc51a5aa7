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
"""One table from every run_alignment.py result in --out_dir: each method × reward × seed, with its control.

    python benchmarks/summarize_alignment.py [--out_dir benchmarks/out]

Reads alignment_<reward>[_flipped]_seed<seed>[_<tag>]_results.json (files that differ only in the tag are merged). For each (method, reward, seed) trained on the true
labels: the reward gain over the base model at every evaluated step, the gain of the same method and seed trained
on the flipped labels (the control: it must not be positive for an aligning method), fidelity and background
roughness (image quality, lower is cleaner) at the last step against the base model's, and the training wall time
per step (train_inpo.py's whole run, start-up included, over its steps).
"""

import argparse
import glob
import json
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.run_alignment import REPO_ROOT


# An optional tag after the seed (e.g. the method) keeps separate invocations on one reward and seed apart.
NAME = re.compile(r"alignment_(?P<reward>.+?)(?P<flipped>_flipped)?_seed(?P<seed>\d+)(_\w+?)?_results\.json")


def load(out_dir):
    """{(reward, flipped, seed): results.json contents, the methods of every file with that key merged}."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "alignment_*_results.json"))):
        match = NAME.fullmatch(os.path.basename(path))
        if match:
            with open(path) as f:
                run = json.load(f)
            key = (match["reward"], bool(match["flipped"]), int(match["seed"]))
            if key in found:  # the base model's row is the same in both: same model, prompts and seeds
                found[key]["results"].update(run["results"])
            else:
                found[key] = run
    return found


def rows_of(found):
    """Table rows (dicts) for every method trained on the true labels."""
    rows = []
    for (reward, flipped, seed), run in sorted(found.items()):
        if flipped:
            continue
        base = run["results"]["base"]["rows"][0]
        control_run = found.get((reward, True, seed), {"results": {}})
        for method, result in run["results"].items():
            if method == "base":
                continue
            gains = {r["step"]: r["mean_reward"] - base["mean_reward"] for r in result["rows"]}
            last = result["rows"][-1]
            control = control_run["results"].get(method)
            control_base = control_run["results"]["base"]["rows"][0] if control else None
            control_gains = (
                {r["step"]: r["mean_reward"] - control_base["mean_reward"] for r in control["rows"]} if control else {}
            )
            rows.append(
                {
                    "method": method,
                    "reward": reward,
                    "seed": seed,
                    "base_reward": base["mean_reward"],
                    "gains": gains,
                    "control_gain": control_gains[max(control_gains)] if control else None,
                    "control_gains": control_gains,
                    "win_rate": last["win_rate"],
                    "fidelity": last["fidelity"],
                    "base_fidelity": base["fidelity"],
                    "quality": last["quality"],
                    "base_quality": base["quality"],
                    "seconds_per_step": result["train_seconds"] / max(gains),
                    "train_seconds": result["train_seconds"],
                }
            )
    return rows


def markdown(rows):
    lines = [
        (
            "| method | reward (base) | seed | gain at each evaluated step | control gain, last step | fidelity (base) "
            "| roughness ×1000 (base) | s / step |"
        ),
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["reward"], r["method"], r["seed"])):
        gains = " / ".join(f"{g:+.3f}" for _, g in sorted(r["gains"].items()))
        control = "–" if r["control_gain"] is None else f"{r['control_gain']:+.3f}"
        lines.append(
            f"| {r['method']} | {r['reward']} ({r['base_reward']:.3f}) | {r['seed']} | {gains} | {control} | "
            f"{r['fidelity']:.3f} ({r['base_fidelity']:.3f}) | {1000 * r['quality']:.2f} "
            f"({1000 * r['base_quality']:.2f}) | {r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def aggregate(rows):
    """Per (reward, method) over its seeds: {steps: (mean, std) gain, control: (mean, std), fidelity, ...}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["reward"], r["method"]), []).append(r)
    summary = {}
    for key, group in sorted(groups.items()):
        steps = sorted(set.intersection(*(set(r["gains"]) for r in group)))
        summary[key] = {
            "seeds": sorted(r["seed"] for r in group),
            "base_reward": group[0]["base_reward"],
            "gains": {step: mean_std([r["gains"][step] for r in group]) for step in steps},
            "control_gains": {step: mean_std([r["control_gains"].get(step) for r in group]) for step in steps},
            "controls": sum(bool(r["control_gains"]) for r in group),
            **{name: mean_std([r[name] for r in group])[0] for name in ("fidelity", "quality", "win_rate")},
            "base_fidelity": group[0]["base_fidelity"],
            "base_quality": group[0]["base_quality"],
            "seconds_per_step": mean_std([r["seconds_per_step"] for r in group])[0],
            "train_seconds": mean_std([r["train_seconds"] for r in group])[0],
        }
    return summary


def plus_minus(mean, sd):
    return f"{mean:+.3f}" if sd is None else f"{mean:+.3f} ± {sd:.3f}"


def aggregate_markdown(summary):
    lines = [
        "| method | reward (base) | training seeds | gain at 50 / 100 steps, mean ± sd | control gain at 100 (runs) "
        "| win rate | fidelity (base) | roughness ×1000 (base) | s / step | train s |",
        "|---|---|---|---|---|---:|---|---|---:|---:|",
    ]
    for (reward, method), m in summary.items():
        gains = " / ".join(plus_minus(mean, sd) for mean, sd in m["gains"].values())
        last = max(m["gains"])
        control_mean, control_sd = m["control_gains"][last]
        control = "–" if control_mean is None else f"{plus_minus(control_mean, control_sd)} ({m['controls']})"
        lines.append(
            f"| {method} | {reward} ({m['base_reward']:.3f}) | {','.join(map(str, m['seeds']))} | {gains} | "
            f"{control} | {m['win_rate']:.2f} | {m['fidelity']:.3f} ({m['base_fidelity']:.3f}) | "
            f"{1000 * m['quality']:.2f} ({1000 * m['base_quality']:.2f}) | {m['seconds_per_step']:.2f} | "
            f"{m['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary, path):
    """Mean gain against steps per method (solid) and its flipped-label control (dashed), one panel per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = sorted({reward for reward, _ in summary})
    methods = sorted({method for _, method in summary})
    colours = {method: plt.cm.tab20(i % 20) for i, method in enumerate(methods)}
    figure, axes = plt.subplots(1, len(rewards), figsize=(6 * len(rewards), 4.5), squeeze=False)
    for axis, reward in zip(axes[0], rewards):
        for (r, method), m in summary.items():
            if r != reward:
                continue
            steps = [0, *m["gains"]]
            means = [0, *(mean for mean, _ in m["gains"].values())]
            sds = [0, *(sd or 0 for _, sd in m["gains"].values())]
            # Thick: the scripts' default and the baseline.
            width = 2.5 if method in ("inverted_noise_mix50_k5", "diffusion_dpo") else 1.2
            label = f"{method} ({len(m['seeds'])} seed{'s' if len(m['seeds']) > 1 else ''})"
            axis.errorbar(
                steps, means, yerr=sds, marker="o", capsize=3, color=colours[method], linewidth=width, label=label
            )
            controls = [m["control_gains"][step][0] for step in m["gains"]]
            if all(c is not None for c in controls):
                axis.plot(steps, [0, *controls], linestyle="--", color=colours[method], linewidth=width, alpha=0.6)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_title(f"{reward} (dashed: flipped-label control)")
        axis.set_xlabel("optimizer steps")
        axis.set_ylabel("reward gain")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "out"))
    parser.add_argument("--plot", default=None, help="Also write the mean-gain plot (PNG) here.")
    args = parser.parse_args(argv)
    rows = rows_of(load(args.out_dir))
    summary = aggregate(rows)
    table = aggregate_markdown(summary) + "\nPer seed:\n\n" + markdown(rows)
    print(table)
    if args.plot:
        plot(summary, args.plot)
    return table


if __name__ == "__main__":
    main()
