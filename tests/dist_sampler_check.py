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
"""Run under torchrun by test_distributed.py: which pairs does each process read in two epochs?

Map-style: pair indices from the prepared data loader. --streaming: a digest of each pair's pixels (no flips),
read from StreamingPairs until its third epoch begins, so pairs can be matched across processes and epochs.
"""

import hashlib
import json
import sys

import torch
from accelerate.utils import gather_object

import train_inpo


args = train_inpo.parse_args(sys.argv[1:])
accelerator = train_inpo.make_accelerator(args)
epochs = []
if args.streaming:
    stream = train_inpo.load_preference_stream(
        args.dataset_name,
        "train",
        None,
        args.shuffle_buffer_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    pairs = train_inpo.StreamingPairs(stream, args.resolution, False, False, args.seed, accelerator)
    mine = [[], []]
    for example in pairs:
        if pairs.epoch == 2:
            break
        mine[pairs.epoch].append(hashlib.sha1(example["pixel_values"].numpy().tobytes()).hexdigest()[:12])
    epochs = [gather_object([per_epoch]) for per_epoch in mine]
else:
    dataset = train_inpo.load_preference_dataset(args.dataset_name, "train", log=lambda _: None)
    pairs = train_inpo.PreferencePairs(dataset, args.resolution, seed=args.seed)
    dataloader = accelerator.prepare(train_inpo.make_dataloader(pairs, train_inpo.collate_pairs, args))
    for epoch in range(2):
        pairs.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        mine = torch.cat([batch["indices"] for batch in dataloader])
        epochs.append(accelerator.gather(mine[None]).tolist())  # (processes, pairs per process)
if accelerator.is_main_process:
    print("EPOCHS=" + json.dumps(epochs))
