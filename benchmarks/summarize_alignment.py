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
            rows.append(
                {
                    "method": method,
                    "reward": reward,
                    "seed": seed,
                    "base_reward": base["mean_reward"],
                    "gains": gains,
                    "control_gain": control["rows"][-1]["mean_reward"] - control_base["mean_reward"]
                    if control
                    else None,
                    "fidelity": last["fidelity"],
                    "base_fidelity": base["fidelity"],
                    "quality": last["quality"],
                    "base_quality": base["quality"],
                    "seconds_per_step": result["train_seconds"] / max(gains),
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "out"))
    args = parser.parse_args(argv)
    table = markdown(rows_of(load(args.out_dir)))
    print(table)
    return table


if __name__ == "__main__":
    main()
