"""Run under torchrun by test_distributed.py: which pairs does each process read in two epochs?"""

import json
import sys

import torch

import inpo_utils
import train_inpo

args = train_inpo.parse_args(sys.argv[1:])
accelerator = inpo_utils.make_accelerator(args)
dataset = inpo_utils.load_preference_dataset(args.dataset_name, "train", log=lambda _: None)
pairs = inpo_utils.PreferencePairs(dataset, args.resolution, seed=args.seed)
dataloader = accelerator.prepare(inpo_utils.make_dataloader(pairs, inpo_utils.collate_pairs, args))
epochs = []
for epoch in range(2):
    pairs.set_epoch(epoch)
    dataloader.set_epoch(epoch)
    mine = torch.cat([batch["indices"] for batch in dataloader])
    epochs.append(accelerator.gather(mine[None]).tolist())  # (processes, pairs per process)
if accelerator.is_main_process:
    print("EPOCHS=" + json.dumps(epochs))
