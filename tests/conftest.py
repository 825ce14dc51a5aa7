"""Fixtures: tiny pipelines and a tiny Pick-a-Pic dataset built offline and saved the way real ones are."""

import os
import subprocess
import sys

import pytest


# One thread per process: on a 2-core machine, torch's default thread pool oversubscribes the cores as soon as a
# subprocess runs beside pytest, and tiny models then run 10-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch


torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import demo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return demo.build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory):
    return demo.build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd-v")), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return demo.build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """8 decided pairs + 1 tie, 40x48 images."""
    return demo.build_tiny_pickapic(str(tmp_path_factory.mktemp("pickapic")), num_pairs=8)


@pytest.fixture(scope="session")
def uninterrupted(tiny_sd, pickapic, tmp_path_factory):
    """A 6-step LoRA run saving every 2 steps: what interrupted and resumed runs must reproduce."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=6, checkpointing_steps=2))
    return out


def launch(script, *args, num_processes=1, check=True):
    """Run a training script the way users do, through `accelerate launch`, on the CPU."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--cpu",
        "--num_cpu_threads_per_process",
        "1",
        os.path.join(REPO, script),
        *map(str, args),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def tiny_run_args(model, data, output_dir, steps=4, **overrides):
    """Flags for a few-step tiny run; keyword overrides replace or add flags (True adds a bare switch)."""
    flags = {
        "pretrained_model_name_or_path": model,
        "dataset_name": data,
        "output_dir": output_dir,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "beta_dpo": 500,
        "rank": 4,
        "seed": 0,
        "report_to": "tensorboard",
        "checkpointing_steps": 1000,
    }
    flags.update(overrides)
    args = []
    for name, value in flags.items():
        if value is False or value is None:
            continue
        args.append(f"--{name}")
        if value is not True:
            args.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
    return args


def read_scalars(output_dir, tag):
    """Values of a logged scalar, by step, from the tensorboard event files of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for root, _, files in os.walk(os.path.join(output_dir, "logs")):
        if any(name.startswith("events.out") for name in files):
            events = EventAccumulator(root)
            events.Reload()
            if tag in events.Tags()["scalars"]:
                values.update({event.step: event.value for event in events.Scalars(tag)})
    return values
