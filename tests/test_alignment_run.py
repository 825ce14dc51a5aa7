"""The alignment benchmark at test size: InPO, trained by train_inpo.py on pairs labelled by a known reward, must
raise that reward over the base model without losing the captions' colours.

Drives benchmarks/run_alignment.py end to end (base model, pairs, `accelerate launch train_inpo.py`, evaluation)
on a base model small enough to pretrain inside the test.
"""

import dataclasses

from benchmarks import alignment_world as world
from benchmarks import run_alignment


# Pretrains in about a minute on one core. Its samples are rough (colour fidelity 0.42-0.52 at 10 DDIM steps over
# seeds 0-2, chance 0.25) but spread over the reward (background brightness), which is all the pairs need.
SMALL_BASE = world.BaseModelConfig(num_train_images=1024, vae_steps=100, vae_lr=3e-3, unet_steps=400, unet_lr=2e-3,
                                   batch_size=16)  # fmt: skip
# InPO with the exact endpoint (the paper's grid endpoint moves this reward the wrong way: see the README), at a
# learning rate that moves 40 steps far enough.
RUN = ["--methods", "inpo_exact", "--num_pairs", "128", "--num_inference_steps", "10", "--max_train_steps", "40",
       "--eval_every", "40", "--eval_seeds", "4", "--train_batch_size", "8", "--learning_rate", "1e-3"]  # fmt: skip
# Over seeds 0-2 InPO won 0.92 / 0.98 / 0.81 of the 48 paired samples (same prompt and initial noise as the base
# model; 0.5 ± 0.07 if training did nothing), raised the mean reward by 0.056 / 0.027 / 0.010, and moved fidelity
# by -0.08 / +0.02 / -0.08.
MIN_WIN_RATE = 0.7
MAX_FIDELITY_DROP = 0.15


def run_small_benchmark(out_dir, seed=0):
    """The base model's and InPO's final evaluation rows ({mean_reward, win_rate, fidelity, ...})."""
    model_config = dataclasses.replace(SMALL_BASE, seed=seed)
    results = run_alignment.main([*RUN, "--seed", str(seed), "--out_dir", str(out_dir)], model_config=model_config)
    return results["base"]["rows"][0], results["inpo_exact"]["rows"][-1]


def test_inpo_raises_the_reward_over_the_base_model(tmp_path):
    base, inpo = run_small_benchmark(tmp_path)
    assert inpo["win_rate"] > MIN_WIN_RATE, (base, inpo)
    assert inpo["mean_reward"] > base["mean_reward"], (base, inpo)
    assert inpo["fidelity"] > base["fidelity"] - MAX_FIDELITY_DROP, (base, inpo)
