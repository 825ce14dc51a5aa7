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
"""Fixtures: tiny pipelines and a tiny Pick-a-Pic dataset (built by fixtures.py), and ways to launch the scripts."""

import contextlib
import importlib
import io
import logging
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

import pytest


# One thread per process: on a 2-core machine, torch's default thread pool oversubscribes the cores as soon as a
# subprocess runs beside pytest, and tiny models then run 10-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch


torch.set_num_threads(1)
import datasets  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


def _shorten_datasets_thread_shutdown_sleep():
    """datasets sleeps 5 s whenever a streamed parquet file's iterator ends (every epoch), to let pyarrow's reader
    threads exit (apache/arrow#45214). Nothing for a real dataset; for the 8-pair test files it was most of the
    streaming tests' wall time, with the CPU idle. A fraction of a second is ample for files this small."""
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2


_shorten_datasets_thread_shutdown_sleep()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fixtures import build_tiny_pickapic, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory):
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd-v")), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """8 decided pairs + 1 tie, 40x48 images."""
    return build_tiny_pickapic(str(tmp_path_factory.mktemp("pickapic")), num_pairs=8)


@pytest.fixture(scope="session")
def uninterrupted(tiny_sd, pickapic, tmp_path_factory):
    """A 6-step LoRA run saving every 2 steps: what interrupted and resumed runs must reproduce. Its pairs are
    decoded by data loader workers (the default of a real run; the other tiny runs decode in the process), so
    the resumed runs, which decode in the process, also check that workers draw the same augmentation."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    flags = tiny_run_args(tiny_sd, pickapic, out, steps=6, checkpointing_steps=2, dataloader_num_workers=2)
    launch("train_inpo.py", *flags)
    return out


@pytest.fixture
def simulated_fp16(monkeypatch):
    """accelerate's fp16 path on the CPU, where accelerate itself refuses fp16: the Accelerator is set up as for bf16,
    then switched to fp16 with a CPU `torch.amp.GradScaler` (2^16 initial scale, as on CUDA) and CPU fp16 autocast.
    Frozen weights load in fp16, gradients are scaled, unscaled by `clip_grad_norm_` and stepped by the scaler."""
    original_init = Accelerator.__init__

    def init(self, *args, **kwargs):
        fp16 = kwargs.get("mixed_precision") == "fp16"
        if fp16:
            kwargs["mixed_precision"] = "bf16"
        original_init(self, *args, **kwargs)
        if fp16:
            self.state._mixed_precision = "fp16"
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    monkeypatch.setattr(Accelerator, "__init__", init)


@pytest.fixture
def overflow_at_backward(monkeypatch):
    """Make one trainable gradient inf after the listed backward calls (1-based), as an fp16 overflow does."""
    calls, overflowing = [0], set()
    original_backward = Accelerator.backward

    def backward(self, loss, **kwargs):
        original_backward(self, loss, **kwargs)
        calls[0] += 1
        if calls[0] in overflowing:
            parameter = next(p for p in self._models[0].parameters() if p.requires_grad)
            parameter.grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(Accelerator, "backward", backward)
    return overflowing


class RunResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def launch(script, *args, check=True):
    """Run a training script as `python script.py ...` would, but inside this test process.

    A fresh interpreter per run costs ~12 s of CPU here just to import torch, diffusers and transformers, which made
    the suite's launches its slowest part. The script runs from its `__main__` block (`runpy`), output and log
    records are captured, an exception is a non-zero return code with its traceback on stderr, and accelerate's
    process-wide state is reset afterwards so the next run starts as a new process would. `accelerate_launch` below
    keeps a few runs on the real launcher.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as the scripts' basicConfig sets it in a fresh process
    argv = sys.argv
    sys.argv = [os.path.join(REPO, script), *map(str, args)]
    returncode = 0
    # A test may have built an Accelerator in this process; the run must start from a fresh state all the same.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as exit:
                returncode = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if exit.code is not None and not isinstance(exit.code, int):
                    print(exit.code, file=sys.stderr)
            except Exception:
                returncode = 1
                traceback.print_exc()
    finally:
        sys.argv = argv
        root.removeHandler(handler)
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(1)
    result = RunResult(returncode, stdout.getvalue(), stderr.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def accelerate_launch(script, *args, check=True, cwd=REPO):
    """Run a training script the way users do, through `accelerate launch` in its own process, on the CPU."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        "--num_cpu_threads_per_process",
        "1",
        script,
        *map(str, args),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return RunResult(result.returncode, result.stdout, result.stderr)


# ZeRO-2 on every process, as accelerate_configs/deepspeed_zero2.yaml sets it (without accumulation or fp16).
DEEPSPEED_ZERO2_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
}

# Workers are forked from a server that imported these once: a fresh interpreter per process would pay ~12 s of
# CPU for the imports alone, twice per two-process run.
_PRELOAD = [
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "inpo_utils",
    "train_inpo",
    "train_inpo_sdxl",
    "train_inpo_sd3",
]
_forkserver = None


def _process_context():
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(_PRELOAD)
    return _forkserver


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(argv, env, stdout_path, stderr_path, rank_setup=None):
    """One process of a multi-process run: what torchrun would start, forked from the preloaded server.
    `rank_setup` names a function of tests/rank_faults.py to call first (a fault to inject)."""
    os.environ.update(env)
    if rank_setup is not None:
        getattr(importlib.import_module("rank_faults"), rank_setup)()
    _shorten_datasets_thread_shutdown_sleep()
    sys.stdout = open(stdout_path, "w", buffering=1)
    sys.stderr = open(stderr_path, "w", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True)
    sys.argv = list(argv)
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_processes(script, *args, nproc=2, deepspeed=False, check=True, timeout=600, env=None, rank_setup=None):
    """`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 script ARGS`: `nproc` gloo processes with torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so accelerate runs MULTI_CPU. With `deepspeed`, ZeRO-2 through
    tests/deepspeed_cpu.py; `env` adds variables (e.g. ACCELERATE_MIXED_PRECISION); `rank_setup` as `_run_rank`.
    stdout and stderr are those of all processes, rank 0 first."""
    context = _process_context()
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "OMP_NUM_THREADS": "1",
    }
    common.update(DEEPSPEED_ZERO2_ENV if deepspeed else {"ACCELERATE_USE_CPU": "1"})
    common.update(env or {})
    shim = [os.path.join(REPO, "tests", "deepspeed_cpu.py")] if deepspeed else []
    argv = [*shim, os.path.join(REPO, script), *map(str, args)]
    logs = tempfile.mkdtemp(prefix="ranks-")
    processes = []
    for rank in range(nproc):
        env = dict(common, RANK=str(rank), LOCAL_RANK=str(rank))
        paths = (os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err"))
        processes.append(context.Process(target=_run_rank, args=(argv, env, *paths, rank_setup)))
        processes[-1].start()
    deadline = time.time() + timeout
    # A process that fails leaves the others waiting in a collective: stop them all, as torchrun does.
    while any(p.is_alive() for p in processes) and time.time() < deadline:
        if any(p.exitcode not in (None, 0) for p in processes):
            break
        time.sleep(0.1)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()

    def read(suffix):
        return "".join(open(os.path.join(logs, f"{rank}.{suffix}")).read() for rank in range(nproc))

    returncode = next((p.exitcode for p in processes if p.exitcode != 0), 0)
    result = RunResult(returncode, read("out"), read("err"))
    if check and returncode != 0:
        raise AssertionError(f"{script} failed ({returncode}) in {nproc} processes:\n{result.stderr[-5000:]}")
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
        "dataloader_num_workers": 0,
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
