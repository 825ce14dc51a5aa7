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
"""--streaming: ties and bad rows handled as in the map-style path, epochs reshuffled, exact resume in one process,
and a clear message where a different process count makes the position unrestorable."""

import hashlib
import json
import logging
import os
import shutil
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_inpo
from benchmarks.pickapic_format import encode_png
from conftest import launch, run_processes, tiny_run_args
from fixtures import build_tiny_pickapic


ONE_PROCESS = types.SimpleNamespace(process_index=0, num_processes=1, device="cpu")


def digest(example):
    return hashlib.sha1(example["pixel_values"].numpy().tobytes()).hexdigest()


def epochs_of(pairs, count):
    """The examples of the stream's next `count` epochs, by epoch (StreamingPairs runs epochs without end)."""
    first, epochs = pairs.epoch, [[] for _ in range(count)]
    for example in pairs:
        if pairs.epoch - first == count:
            break
        epochs[pairs.epoch - first].append(example)
    return epochs


def truncated_png():
    data = encode_png(np.full((40, 48, 3), 77, dtype=np.uint8))
    return data[: len(data) // 2]  # the header parses, the body does not decode


def test_stream_drops_ties_and_bad_rows_like_the_map_style_path(tmp_path, caplog):
    bad_rows = [
        {
            "caption": "a red square",
            "jpg_0": b"not an image",
            "jpg_1": encode_png(np.zeros((8, 8, 3), np.uint8)),
            "label_0": 1.0,
        },
        {
            "caption": "   ",
            "jpg_0": encode_png(np.zeros((8, 8, 3), np.uint8)),
            "jpg_1": encode_png(np.ones((8, 8, 3), np.uint8)),
            "label_0": 0.0,
        },
        {
            "caption": "a cat",
            "jpg_0": truncated_png(),
            "jpg_1": encode_png(np.ones((8, 8, 3), np.uint8)),
            "label_0": 0.0,
        },
    ]
    path = build_tiny_pickapic(str(tmp_path), num_pairs=4, extra_rows=bad_rows)
    stream = train_inpo.load_preference_stream(
        path, "train", None, shuffle_buffer_size=16, seed=0, process_index=0, num_processes=1
    )
    pairs = train_inpo.StreamingPairs(stream, 32, random_crop=False, hflip=False, seed=0, accelerator=ONE_PROCESS)
    with caplog.at_level(logging.INFO, logger="train_inpo"):
        (streamed,) = epochs_of(pairs, 1)

    map_style = train_inpo.PreferencePairs(
        train_inpo.load_preference_dataset(path, "train", log=lambda _: None), 32, hflip=False
    )
    decodable = [example for example in map(map_style.decoded, range(len(map_style))) if example is not None]
    assert len(streamed) == 4 and sorted(map(digest, streamed)) == sorted(map(digest, decodable))
    summary = next(r.message for r in caplog.records if r.message.startswith("Streamed epoch 0"))
    assert "4 pairs, 1 ties dropped, 3 rows skipped" in summary
    assert "jpg_0 does not decode" in summary and "empty caption" in summary and "image does not decode" in summary


def test_stream_reshuffles_each_epoch_and_reads_every_pair_once(pickapic):
    stream = train_inpo.load_preference_stream(
        pickapic, "train", None, shuffle_buffer_size=16, seed=0, process_index=0, num_processes=1
    )
    pairs = train_inpo.StreamingPairs(stream, 32, random_crop=False, hflip=False, seed=0, accelerator=ONE_PROCESS)
    first, second = [list(map(digest, epoch)) for epoch in epochs_of(pairs, 2)]
    assert len(first) == len(set(first)) == 8
    assert sorted(first) == sorted(second) and first != second


def test_stream_with_missing_columns_fails_before_training(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"caption": "x", "jpg_0": b"", "label_0": 1.0}]),
        str(tmp_path / "train-00000-of-00001.parquet"),
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['jpg_1'\]"):
        train_inpo.load_preference_stream(str(tmp_path), "train", None, 8, 0, 0, 1)


def streaming_args(model, data, out, **overrides):
    return tiny_run_args(model, data, out, streaming=True, shuffle_buffer_size=4, **overrides)


def test_streaming_resume_continues_exactly(tiny_sd, pickapic, tmp_path):
    # 6 steps of 2 pairs over 8 pairs: the checkpoint at step 3 sits inside the first epoch.
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    launch("train_inpo.py", *streaming_args(tiny_sd, pickapic, whole, steps=6, checkpointing_steps=3))
    os.makedirs(resumed)
    for name in ("checkpoint-3", "inpo_run.json"):
        (shutil.copytree if name.startswith("checkpoint") else shutil.copy)(f"{whole}/{name}", f"{resumed}/{name}")
    result = launch(
        "train_inpo.py",
        *streaming_args(tiny_sd, pickapic, resumed, steps=6, checkpointing_steps=3, resume_from_checkpoint="latest"),
    )
    assert "Streamed epoch 0 on process 0 (from row 6)" in result.stderr
    expected, got = (load_file(f"{d}/pytorch_lora_weights.safetensors") for d in (whole, resumed))
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() == 0, name


def test_two_process_stream_partitions_each_epoch(tiny_sd, pickapic, tmp_path):
    result = run_processes("tests/dist_sampler_check.py", *streaming_args(tiny_sd, pickapic, str(tmp_path), seed=3))
    epochs = json.loads(result.stdout.split("EPOCHS=")[1].splitlines()[0])
    stream = train_inpo.load_preference_stream(pickapic, "train", None, 16, 0, 0, 1)
    (epoch,) = epochs_of(train_inpo.StreamingPairs(stream, 32, False, False, 0, ONE_PROCESS), 1)
    all_pairs = sorted(digest(example)[:12] for example in epoch)
    for per_process in epochs:
        assert all(per_process)  # both processes read some
        assert sorted(per_process[0] + per_process[1]) == all_pairs  # each pair exactly once per epoch
    assert epochs[0] != epochs[1]


def test_resume_with_another_process_count_says_what_it_cannot_restore(pickapic, caplog):
    from accelerate.state import PartialState

    PartialState(cpu=True)  # the warning goes through accelerate's main-process logger
    stream = train_inpo.load_preference_stream(pickapic, "train", None, 4, 0, 0, 1)
    pairs = train_inpo.StreamingPairs(stream, 32, False, False, 0, ONE_PROCESS)
    written_by_two = {"positions": torch.tensor([[1, 3], [2, 0]])}  # (epoch, rows read) of each process
    with caplog.at_level(logging.WARNING):
        pairs.load_state_dict(written_by_two)
    assert (pairs.epoch, pairs.rows_read) == (1, 0)  # the earliest unfinished epoch, from its start
    assert "written by 2 processes, this run has 1" in caplog.text and "Restarting streamed epoch 1" in caplog.text
    pairs.load_state_dict({"positions": torch.tensor([[2, 5]])})  # same process count: exact position
    assert (pairs.epoch, pairs.rows_read) == (2, 5)
