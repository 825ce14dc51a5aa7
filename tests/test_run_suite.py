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
"""benchmarks/run_suite.py's table: gains over seeds with controls, per step and per second against Diffusion-DPO,
the worst case over worlds; and benchmarks/diagnose_suite.py's gradient statistics against a closed form."""

import json
import os

import pytest
import torch
from PIL import Image

from benchmarks import alignment_world as world
from benchmarks import diagnose_suite, run_suite


def write_run(args, world_name, method, seed, flipped, rewards, step_seconds, precompute_seconds=0.0, fidelity=0.9):
    def row(step, reward, fidelity=0.9):
        return {"step": step, "mean_reward": reward, "win_rate": 0.7, "fidelity": fidelity, "quality": 0.01}

    results = {
        "base": {"rows": [row(0, 0.5)], "final_at_guidance": {"1.0": row(0, 0.4)}},
        method: {
            "rows": [row(50, rewards[0], fidelity), row(100, rewards[1], fidelity)],
            "step_seconds": step_seconds,
            "precompute_seconds": precompute_seconds,
            "final_at_guidance": {"1.0": row(100, 0.4 + rewards[1] - 0.5)},
        },
    }
    path = run_suite.results_path(args, world_name, method, seed, flipped)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": {"seed": seed, "flipped_labels": flipped}, "results": results}, f)


def test_suite_summary_compares_with_diffusion_dpo_per_step_and_per_second(tmp_path):
    args = run_suite.parse_args(["--out_dir", str(tmp_path), "--seeds", "0", "1"])
    args.worlds = ["shapes_brightness", "striped_size"]
    args.methods = ["inverted_noise_mix90_k5", "diffusion_dpo", "inverted_noise_mix90_cached_k5"]
    for seed in (0, 1):
        for name in args.worlds:
            write_run(args, name, "diffusion_dpo", seed, False, (0.52, 0.54), 50.0)
            write_run(args, name, "diffusion_dpo", seed, True, (0.48, 0.46), 50.0)
        # The default: 2x Diffusion-DPO's gain per step at 2x the seconds on one world, half its gain on the other.
        write_run(args, "shapes_brightness", "inverted_noise_mix90_k5", seed, False, (0.54, 0.58 + 0.01 * seed), 100.0)
        write_run(args, "shapes_brightness", "inverted_noise_mix90_k5", seed, True, (0.46, 0.42), 100.0)
        write_run(args, "striped_size", "inverted_noise_mix90_k5", seed, False, (0.51, 0.52), 100.0)
        write_run(args, "striped_size", "inverted_noise_mix90_k5", seed, True, (0.49, 0.48), 100.0)
        # From the cache: as fast per step as the default, a quarter of its seconds, but its control rises.
        for name in args.worlds:
            write_run(
                args, name, "inverted_noise_mix90_cached_k5", seed, False, (0.54, 0.58), 15.0, precompute_seconds=10.0
            )
            write_run(
                args, name, "inverted_noise_mix90_cached_k5", seed, True, (0.51, 0.52), 15.0, precompute_seconds=10.0
            )

    summary = run_suite.summarize_world(args, "shapes_brightness")
    default = summary["inverted_noise_mix90_k5"]
    assert default["gain"][0] == pytest.approx(0.085) and default["gain"][1] == pytest.approx(0.01 / 2**0.5)
    assert default["control_gain"][0] == pytest.approx(-0.08)
    assert default["per_step_vs_dpo"] == pytest.approx(0.085 / 0.04)
    assert default["per_second_vs_dpo"] == pytest.approx((0.085 / 100) / (0.04 / 50))
    assert default["gain_at_guidance_1"][0] == pytest.approx(0.085)
    assert default["aligns"] and default["keeps_fidelity"]
    cached = summary["inverted_noise_mix90_cached_k5"]
    assert cached["seconds"][0] == pytest.approx(25.0) and cached["per_second_vs_dpo"] == pytest.approx(
        (0.08 / 25) / (0.04 / 50)
    )
    assert not cached["aligns"]  # its control gains +0.02

    summaries = {name: run_suite.summarize_world(args, name) for name in args.worlds}
    table = run_suite.markdown(args, summaries)
    assert "| striped_size | inverted_noise_mix90_k5 | +0.020 ± 0.000 | -0.020 ± 0.000 |" in table
    assert "| inverted_noise_mix90_k5 | 2 | yes | 0.50× | 0.25× |" in table  # the worst world is the striped one
    assert "| inverted_noise_mix90_cached_k5 | 2 | no |" in table
    run_suite.plot(summaries, str(tmp_path / "suite.png"))
    assert Image.open(tmp_path / "suite.png").size[0] > 0


def test_suite_runs_reach_run_alignment_with_the_world_and_a_results_path_it_writes():
    args = run_suite.parse_args(["--out_dir", "/tmp/suite"])
    argv = run_suite.run_argv(args, "striped_size", "inverted_noise_mix90_k5", 2, True)
    from benchmarks import run_alignment

    parsed = run_alignment.parse_args(argv)
    assert parsed.world == "striped_size" and parsed.reward == "object_size" and parsed.flipped_labels
    expected = os.path.join(
        parsed.out_dir,
        f"alignment_{run_alignment.run_tag(parsed)}_seed{parsed.seed}_{parsed.results_tag}_results.json",
    )
    assert run_suite.results_path(args, "striped_size", "inverted_noise_mix90_k5", 2, True) == expected
    assert run_alignment.base_config(parsed) == world.WORLDS["striped_size"].config


def test_gradient_snr_matches_its_closed_form():
    # g = μ + noise, noise N(0, σ² I) in n dimensions: the SNR of a batch of B is ‖μ‖² / (n σ² / B).
    generator = torch.Generator().manual_seed(0)
    pairs, draws, n, sigma = 400, 4, 50, 2.0
    mu = torch.full((n,), 0.5)
    gradients = (mu + sigma * torch.randn(pairs * draws, n, generator=generator)).double()
    timesteps = torch.randint(0, 1000, (pairs * draws,), generator=generator)
    stats = diagnose_suite.gradient_statistics(gradients, timesteps, pairs, draws)
    expected = float(mu @ mu) / (n * sigma**2 / diagnose_suite.BATCH_PAIRS)
    assert stats["snr"] == pytest.approx(expected, rel=0.15)
    assert stats["draw_share"] == pytest.approx(1.0, abs=0.05)  # all of the variance is the draw's here
    for value in stats["snr_by_t"].values():
        assert value == pytest.approx(expected, rel=0.35)
    # Pure noise: the bias-corrected signal is ~0, not the 1/sample-size of a plain ‖mean‖².
    noise_only = diagnose_suite.gradient_statistics(gradients - mu.double(), timesteps, pairs, draws)
    assert abs(noise_only["snr"]) < 0.05 * expected


def test_diagnosis_runs_on_a_world_and_inverted_noise_removes_the_draw_variance(tmp_path):
    import shutil

    from benchmarks import run_alignment

    folder = tmp_path / world.DEFAULT_WORLD
    shutil.copytree(run_suite.ASSET, folder / "base_model")
    argv = ["--out_dir", str(folder), "--num_pairs", "12", "--num_inference_steps", "4"]
    run_alignment.prepare_world(run_alignment.parse_args(argv))
    args = type("Args", (), {"out_dir": str(tmp_path), "num_pairs": 8, "draws_per_pair": 3})()
    diagnosis = diagnose_suite.diagnose_world(args, world.DEFAULT_WORLD)
    sources = diagnosis["sources"]
    assert set(sources) == set(diagnose_suite.SOURCES)
    # With no fresh noise, a pair's draws differ only in t; Diffusion-DPO's also in the noise.
    assert sources["inverted_noise_only"]["draw_share"] < sources["diffusion_dpo"]["draw_share"]
    assert all(v == v for s in sources.values() for v in (s["snr"], s["half_cosine"]))  # finite, not NaN
    assert diagnosis["pairs"] <= 8 and diagnosis["mean_gap"] > 0  # preferred minus rejected reward
