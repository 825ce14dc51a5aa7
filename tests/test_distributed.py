"""Two CPU processes (gloo) through torchrun: data sharding, synchronised weights, cross-process-count resume."""

import json
import os
import subprocess
import sys

from conftest import REPO, launch, read_scalars, tiny_run_args


def torchrun(script, *args, nproc=2):
    """`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 script`: the launch form that gives accelerate a
    MULTI_CPU (gloo) run here; `accelerate launch --cpu --num_processes 2` runs one process only."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533",
               os.path.join(REPO, script), *map(str, args)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_each_pair_is_read_exactly_once_per_epoch_across_processes(tiny_sd, pickapic, tmp_path):
    result = torchrun("tests/dist_sampler_check.py", *tiny_run_args(tiny_sd, pickapic, str(tmp_path), seed=3))
    epochs = json.loads(result.stdout.split("EPOCHS=")[1].splitlines()[0])
    for per_process in epochs:
        assert len(per_process) == 2 and len(per_process[0]) == 4  # 8 pairs, 2 processes
        assert sorted(per_process[0] + per_process[1]) == list(range(8))
    assert epochs[0] != epochs[1]  # a new shuffle each epoch


def test_two_process_sd_run_then_one_process_resume(tiny_sd, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = torchrun("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=2, checkpointing_steps=2))
    log = result.stderr
    assert "Num processes: 2" in log and "total pairs per step (processes x accumulation) = 4" in log
    assert "Trained weights identical on all 2 processes" in log
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "random_states_1.pkl"))
    resumed = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=4, checkpointing_steps=2,
                                                     resume_from_checkpoint="latest"))  # fmt: skip
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))
    assert sorted(read_scalars(out, "loss")) == [1, 2, 3, 4]


def test_two_process_sdxl_run(tiny_sdxl, pickapic, tmp_path):
    out = str(tmp_path / "run")
    result = torchrun("train_inpo_sdxl.py", *tiny_run_args(tiny_sdxl, pickapic, out, steps=2))
    assert "Trained weights identical on all 2 processes" in result.stderr
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = os.path.join(REPO, "accelerate_configs")
    kinds = {name: load_config_from_file(os.path.join(folder, name)).distributed_type for name in os.listdir(folder)}
    assert {str(kind).split(".")[-1] for kind in kinds.values()} == {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}
