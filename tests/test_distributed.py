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
"""Two CPU processes (gloo) through torchrun: data sharding, synchronised weights, cross-process-count resume."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import rank_faults
import torch
from safetensors.torch import load_file

import train_inpo
from benchmarks.pickapic_format import encode_png
from conftest import REPO, launch, read_scalars, run_processes, tiny_run_args
from fixtures import build_tiny_pickapic


def torchrun(script, *args):
    """`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 script`, for real: the launch form that gives accelerate a
    MULTI_CPU (gloo) run here (`accelerate launch --cpu --num_processes 2` runs one process only). The other
    multi-process tests fork their processes from preloaded interpreters (conftest.run_processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, ACCELERATE_USE_CPU="1")
    # --standalone: a free port per run, so test workers running side by side do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(REPO, script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_each_pair_is_read_exactly_once_per_epoch_across_processes(tiny_sd, pickapic, tmp_path):
    result = run_processes("tests/dist_sampler_check.py", *tiny_run_args(tiny_sd, pickapic, str(tmp_path), seed=3))
    epochs = json.loads(result.stdout.split("EPOCHS=")[1].splitlines()[0])
    for per_process in epochs:
        assert len(per_process) == 2 and len(per_process[0]) == 4  # 8 pairs, 2 processes
        assert sorted(per_process[0] + per_process[1]) == list(range(8))
    assert epochs[0] != epochs[1]  # a new shuffle each epoch


def resumed_from_copy(checkpoint, folder):
    """A fresh output folder holding only `checkpoint` (and the run settings), as after a crash right after it."""
    os.makedirs(folder)
    shutil.copytree(checkpoint, os.path.join(folder, os.path.basename(checkpoint)))
    shutil.copy(os.path.join(os.path.dirname(checkpoint), "inpo_run.json"), folder)
    return folder


def assert_same_lora(expected_dir, got_dir):
    expected, got = (load_file(os.path.join(d, "pytorch_lora_weights.safetensors")) for d in (expected_dir, got_dir))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_two_process_sd_run_then_one_process_resume(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = torchrun("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, checkpointing_steps=2))
    log = result.stderr
    assert "Num processes: 2" in log and "total pairs per step (processes x accumulation) = 4" in log
    assert "Trained weights identical on all 2 processes" in log
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "random_states_1.pkl"))
    resumed = launch(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, out, steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"),
    )
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))
    assert sorted(read_scalars(out, "loss")) == [1, 2, 3, 4]


def test_deepspeed_zero2_full_fine_tune_exports_a_loadable_pipeline(tiny_sd, pickapic, tmp_path):
    pytest.importorskip("deepspeed")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = str(tmp_path / "run")
    result = run_processes(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, out, steps=2, checkpointing_steps=2, train_mode="full", learning_rate=1e-4),
        deepspeed=True,
    )
    assert (
        "DistributedType.DEEPSPEED" in result.stderr
        and "Trained weights identical on all 2 processes" in result.stderr
    )
    tuned = StableDiffusionPipeline.from_pretrained(out).unet
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) > len(list(base.parameters())) // 2
    saved = UNet2DConditionModel.from_pretrained(os.path.join(out, "checkpoint-2"), subfolder="unet")
    assert all(torch.equal(p, saved.get_parameter(n)) for n, p in tuned.named_parameters())


def test_deepspeed_zero2_bf16_lora_trains(tiny_sd, pickapic, tmp_path):
    # bf16 as on a GPU: DeepSpeed casts the whole UNet to bf16 and runs no autocast, so the policy's inputs must be
    # cast to its dtype.
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "run")
    result = run_processes(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, out, steps=1),
        deepspeed=True,
        env={"ACCELERATE_MIXED_PRECISION": "bf16"},
    )
    assert "Mixed precision type: bf16" in result.stderr and "DistributedType.DEEPSPEED" in result.stderr
    assert all(math.isfinite(loss) for loss in read_scalars(out, "loss").values())
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(weight).all() for weight in lora.values())


def test_deepspeed_zero2_lora_resumes_exactly_in_two_processes_and_loads_in_diffusers(tiny_sd, pickapic, tmp_path):
    # Also the regression test for resuming any 2-process checkpoint in 2 processes (rank 1's generator state).
    pytest.importorskip("deepspeed")
    from diffusers import StableDiffusionPipeline

    out = str(tmp_path / "run")
    run_processes(
        "train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, checkpointing_steps=1), deepspeed=True
    )
    again = resumed_from_copy(os.path.join(out, "checkpoint-1"), str(tmp_path / "again"))
    result = run_processes(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, again, steps=2, checkpointing_steps=1, resume_from_checkpoint="latest"),
        deepspeed=True,
    )
    assert "Loading DeepSpeed Model and Optimizer" in result.stderr
    assert_same_lora(out, again)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(out)
    assert pipe.get_active_adapters()


def test_fsdp_refuses_what_it_cannot_run():
    from accelerate.utils import DistributedType

    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP)
    settings = {"train_mode": "full", "latent_source": "inverted_noise"}
    train_inpo.check_sharding(types.SimpleNamespace(**settings), fsdp)  # the supported set-up passes
    with pytest.raises(ValueError, match="FSDP is for --train_mode full"):
        train_inpo.check_sharding(types.SimpleNamespace(**dict(settings, train_mode="lora")), fsdp)
    with pytest.raises(ValueError, match="inverts with the policy"):
        train_inpo.check_sharding(types.SimpleNamespace(**dict(settings, latent_source="inversion")), fsdp)


def test_two_process_sdxl_run_survives_a_pair_that_fails_to_decode_on_one_process(tiny_sdxl, tmp_path):
    # Batch 1: the process that draws the broken pair would have no batch while the other enters the step's
    # collectives; it trains on the next pair instead. Every pair is drawn in the run's 5 steps (9 pairs, 2 processes).
    intact = encode_png(np.full((40, 48, 3), 200, dtype=np.uint8))
    broken = {"caption": "a red square", "jpg_0": intact, "jpg_1": intact[: len(intact) // 2], "label_0": 1.0}
    data = build_tiny_pickapic(str(tmp_path / "data"), num_pairs=8, extra_rows=[broken])
    out = str(tmp_path / "run")
    result = run_processes(
        "train_inpo_sdxl.py",
        # No data loader workers: their log lines would not reach the processes' stderr read here.
        *tiny_run_args(tiny_sdxl, data, out, steps=5, train_batch_size=1, dataloader_num_workers=0),
        timeout=300,
    )
    assert "9 pairs kept" in result.stderr  # its header passes the scan, which the two processes shared
    assert "image does not decode" in result.stderr and "in place of 8" in result.stderr
    assert "Trained weights identical on all 2 processes" in result.stderr
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_nccl_timeout_bounds_the_wait_for_a_slow_process(tiny_sd, pickapic, tmp_path):
    started = time.time()
    result = run_processes(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, str(tmp_path / "run"), steps=1, nccl_timeout=5),
        rank_setup="slow_model_loading_on_rank_1",
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Timed out waiting 5000ms" in result.stderr  # gloo's collective, under the --nccl_timeout set here
    assert time.time() - started < rank_faults.SLOW_RANK_DELAY_S  # rank 0 gave up; it did not wait out rank 1


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = os.path.join(REPO, "accelerate_configs")
    kinds = {name: load_config_from_file(os.path.join(folder, name)).distributed_type for name in os.listdir(folder)}
    assert {str(kind).split(".")[-1] for kind in kinds.values()} == {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}


def test_a_resumed_two_process_precompute_deals_the_missing_shards_to_both_processes(tiny_sd, pickapic, tmp_path):
    cache = str(tmp_path / "cache")
    flags = tiny_run_args(
        tiny_sd,
        pickapic,
        str(tmp_path / "out"),
        inversion_cache_dir=cache,
        cache_shard_size=2,
        precompute_inversion_cache=True,
    )
    run_processes("train_inpo.py", *flags)
    shards = sorted(name for name in os.listdir(cache) if name.startswith("shard-"))
    assert len(shards) == 4
    # Shards 0 and 2 were both process 0's; after they are lost each process writes one of them, and the manifest
    # (written last) is there again.
    for name in (shards[0], shards[2]):
        os.remove(os.path.join(cache, name))
    os.remove(os.path.join(cache, "manifest.json"))
    result = run_processes("train_inpo.py", *flags)
    assert result.stderr.count("1 of the missing 2 to this process") == 2
    assert os.path.isfile(os.path.join(cache, "manifest.json"))
