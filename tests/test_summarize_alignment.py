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
"""benchmarks/summarize_alignment.py: per-seed rows, their mean ± sd with the flipped-label controls, and the plot."""

import json

from PIL import Image

from benchmarks import summarize_alignment


def write_result(out_dir, name, base_reward, method_rewards, train_seconds=10.0):
    def row(step, reward):
        return {"step": step, "mean_reward": reward, "win_rate": 0.75, "fidelity": 0.9, "quality": 0.006}

    results = {"base": {"rows": [row(0, base_reward)]}}
    for method, rewards in method_rewards.items():
        rows = [row(step, reward) for step, reward in zip((50, 100), rewards)]
        results[method] = {"train_seconds": train_seconds, "rows": rows}
    (out_dir / f"alignment_{name}_results.json").write_text(json.dumps({"results": results}))


def test_seeds_are_averaged_with_their_controls_and_tagged_files_merge(tmp_path):
    write_result(tmp_path, "brightness_seed0", 0.4, {"dpo": (0.45, 0.50)})
    write_result(tmp_path, "brightness_seed0_extra", 0.4, {"hybrid": (0.41, 0.42)})  # merged into seed 0
    write_result(tmp_path, "brightness_seed1", 0.4, {"dpo": (0.43, 0.46)})
    write_result(tmp_path, "brightness_flipped_seed0", 0.4, {"dpo": (0.35, 0.30)})
    write_result(tmp_path, "brightness_flipped_seed1", 0.4, {"dpo": (0.39, 0.38)})
    rows = summarize_alignment.rows_of(summarize_alignment.load(str(tmp_path)))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("dpo", 0), ("dpo", 1), ("hybrid", 0)]

    summary = summarize_alignment.aggregate(rows)
    dpo = summary[("brightness", "dpo")]
    assert dpo["seeds"] == [0, 1] and dpo["controls"] == 2
    mean, sd = dpo["gains"][100]
    assert abs(mean - 0.08) < 1e-9 and abs(sd - 0.02 * 2**0.5) < 1e-9  # gains 0.10 and 0.06
    assert abs(dpo["control_gains"][100][0] - (-0.06)) < 1e-9  # controls −0.10 and −0.02
    assert abs(dpo["seconds_per_step"] - 0.1) < 1e-9
    hybrid = summary[("brightness", "hybrid")]
    assert hybrid["controls"] == 0 and hybrid["control_gains"][100] == (None, None)

    table = summarize_alignment.aggregate_markdown(summary)
    assert "| dpo | brightness (0.400) | 0,1 | +0.040 ± 0.014 / +0.080 ± 0.028 | -0.060 ± 0.057 (2) |" in table

    summarize_alignment.plot(summary, str(tmp_path / "plot.png"))
    assert Image.open(tmp_path / "plot.png").size[0] > 0
