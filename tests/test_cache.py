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
"""The invert-once cache: round trip, equality with online InPO, fingerprint refusals, resumable precompute."""

import os
import shutil

import pytest
import torch
from accelerate import Accelerator

import inpo_utils
import train_inpo
from conftest import launch, read_scalars, tiny_run_args


def cache_args(model, data, cache_dir, **overrides):
    flags = {
        "inversion_cache_dir": cache_dir,
        "cache_shard_size": 3,
        "cache_dtype": "fp32",
    }
    flags.update(overrides)
    return train_inpo.parse_args(tiny_run_args(model, data, os.path.join(cache_dir, "out"), **flags))


def precompute_in_process(args, record=None):
    """What `train_inpo.py --precompute_inversion_cache` does, in this process; returns the reference UNet."""
    accelerator = Accelerator(cpu=True)
    scheduler_config = train_inpo.check_model_family(args.pretrained_model_name_or_path, None, None, want_sdxl=False)
    dataset = train_inpo.load_preference_dataset(args.dataset_name, "train", log=lambda _: None)
    frozen = train_inpo.load_frozen_models(args, accelerator)
    reference = train_inpo.load_unet(args).requires_grad_(False)
    inverse_scheduler = inpo_utils.make_inverse_scheduler(scheduler_config, args.inversion_steps)
    if record is not None:
        original = inpo_utils.cache_rows

        def recording(*a, **k):
            rows = original(*a, **k)
            record.append({name: value.clone() for name, value in rows.items()})
            return rows

        inpo_utils.cache_rows = recording
    try:
        fingerprint = inpo_utils.cache_fingerprint(args, scheduler_config, False)
        train_inpo.precompute_inversion_cache(
            args, accelerator, dataset, frozen, reference, inverse_scheduler, fingerprint
        )
    finally:
        if record is not None:
            inpo_utils.cache_rows = original
    return accelerator, scheduler_config, reference


@pytest.mark.parametrize("fresh_noise_mix, draws", [(0.5, 1), (0.0, 2)])
def test_round_trip_reads_back_what_was_computed(tiny_sd, pickapic, tmp_path, fresh_noise_mix, draws):
    args = cache_args(
        tiny_sd, pickapic, str(tmp_path / "cache"), fresh_noise_mix=fresh_noise_mix, cache_draws_per_pair=draws
    )
    recorded = []
    _, scheduler_config, _ = precompute_in_process(args, record=recorded)
    computed = {name: torch.cat([rows[name] for rows in recorded]) for name in recorded[0]}
    fingerprint = inpo_utils.cache_fingerprint(args, scheduler_config, False)
    manifest = inpo_utils.read_cache_manifest(args.inversion_cache_dir, fingerprint)
    assert manifest["num_pairs"] == 8 and manifest["num_shards"] == 3
    pairs = inpo_utils.CachedPairs(args.inversion_cache_dir, manifest)
    assert len(pairs) == 8 and computed["timesteps"].shape == (8, draws)
    for epoch in range(2):
        pairs.set_epoch(epoch)
        draw = epoch % draws  # epoch e reads draw e mod D
        for index in range(8):
            example = pairs[index]
            for name in ("x0", "noise", "encoder_hidden_states"):
                torch.testing.assert_close(example[name], computed[name][index])
            assert example["timestep"] == computed["timesteps"][index, draw]
            torch.testing.assert_close(example["reference_errors"], computed["reference_errors"][index][:, draw])
            if fresh_noise_mix:  # regenerated from the stored seed
                seed = int(computed["noise_seeds"][index, draw])
                expected = torch.randn(example["x0"].shape[1:], generator=torch.Generator().manual_seed(seed))
                torch.testing.assert_close(example["fresh_noise"], expected)
            else:
                assert "fresh_noise" not in example
    assert manifest["bytes_per_pair"] == pytest.approx(sum(os.path.getsize(p) for p in pairs.shards) / 8)


@pytest.mark.parametrize("fresh_noise_mix", [0.5, 0.0])
def test_cached_loss_equals_online_loss_on_the_same_draws(tiny_sd, pickapic, tmp_path, fresh_noise_mix):
    from peft import LoraConfig

    args = cache_args(tiny_sd, pickapic, str(tmp_path / "cache"), fresh_noise_mix=fresh_noise_mix)
    accelerator, scheduler_config, unet = precompute_in_process(args)
    manifest = inpo_utils.read_cache_manifest(
        args.inversion_cache_dir, inpo_utils.cache_fingerprint(args, scheduler_config, False)
    )
    pairs = inpo_utils.CachedPairs(args.inversion_cache_dir, manifest)
    batch = inpo_utils.collate_cached([pairs[i] for i in range(4)])

    # A policy that differs from the reference: LoRA with non-zero up weights; reference = adapters off.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    reference = inpo_utils.AdaptersDisabled(unet)
    inverse_scheduler = inpo_utils.make_inverse_scheduler(scheduler_config, args.inversion_steps)
    cached_loss, cached_metrics = train_inpo.compute_cached_loss(batch, unet, inverse_scheduler, args, accelerator)
    # Online training on the same x0 and conditioning at the cached draws (t and the pair's fresh noise).
    online_loss, online_metrics = inpo_utils.inpo_step_loss(
        unet,
        reference,
        reference,
        batch["x0"],
        batch["encoder_hidden_states"],
        inverse_scheduler,
        args.beta_dpo,
        timesteps=batch["timesteps"],
        fresh_noise_mix=fresh_noise_mix,
        fresh_noise=batch["fresh_noise"],
    )
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=1e-4, abs=1e-6)
    for name in ("reference_mse", "policy_mse", "reward_margin", "timestep"):
        assert cached_metrics[name].item() == pytest.approx(online_metrics[name].item(), rel=1e-3, abs=1e-7)
    assert abs(cached_metrics["reward_margin"].item()) > 1e-4  # the comparison is not between two zeros


def test_stale_and_incomplete_caches_are_refused(tiny_sd, pickapic, tmp_path):
    args = cache_args(tiny_sd, pickapic, str(tmp_path / "cache"))
    _, scheduler_config, _ = precompute_in_process(args)
    stale = cache_args(tiny_sd, pickapic, str(tmp_path / "cache"), resolution=64, inversion_steps=20)
    with pytest.raises(ValueError) as error:
        inpo_utils.read_cache_manifest(
            args.inversion_cache_dir, inpo_utils.cache_fingerprint(stale, scheduler_config, False)
        )
    assert "resolution: cache has 32, this run has 64" in str(error.value)
    assert "inversion_steps: cache has 5, this run has 20" in str(error.value)
    os.remove(os.path.join(args.inversion_cache_dir, "manifest.json"))
    with pytest.raises(ValueError, match="is incomplete"):
        inpo_utils.read_cache_manifest(
            args.inversion_cache_dir, inpo_utils.cache_fingerprint(args, scheduler_config, False)
        )
    with pytest.raises(ValueError, match="does not exist"):
        inpo_utils.read_cache_manifest(str(tmp_path / "nowhere"), {})
    # Precomputing into a folder made with other settings is refused too, instead of mixing shards.
    with pytest.raises(ValueError, match="made with other settings"):
        precompute_in_process(stale)


def test_interrupted_precompute_resumes_without_recomputing_finished_shards(tiny_sd, pickapic, tmp_path):
    args = cache_args(tiny_sd, pickapic, str(tmp_path / "cache"))
    precompute_in_process(args)
    cache_dir = args.inversion_cache_dir
    shards = [os.path.join(cache_dir, f"shard-0000{i}.safetensors") for i in range(3)]
    original_last = open(shards[2], "rb").read()
    # Simulate a kill after two shards: the last shard and the manifest are missing.
    os.remove(shards[2])
    os.remove(os.path.join(cache_dir, "manifest.json"))
    finished = {path: os.stat(path).st_mtime_ns for path in shards[:2]}
    precompute_in_process(args)
    assert {path: os.stat(path).st_mtime_ns for path in shards[:2]} == finished
    assert open(shards[2], "rb").read() == original_last  # deterministic: the same bytes as the first time
    assert os.path.isfile(os.path.join(cache_dir, "manifest.json"))


def test_training_from_cache_needs_neither_vae_nor_text_encoder(tiny_sd, pickapic, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_sd, model)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    flags = {"inversion_cache_dir": cache}  # the defaults: inverted noise with the fresh noise mix
    launch("train_inpo.py", *tiny_run_args(model, pickapic, out, precompute_inversion_cache=True, **flags))
    assert os.path.isfile(os.path.join(cache, "manifest.json"))
    shutil.rmtree(os.path.join(model, "vae"))
    shutil.rmtree(os.path.join(model, "text_encoder"))
    result = launch("train_inpo.py", *tiny_run_args(model, pickapic, out, steps=3, **flags))
    assert "Training from the inversion cache" in result.stderr
    losses = read_scalars(out, "loss")
    assert sorted(losses) == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_cache_flags_that_contradict_are_refused(tmp_path):
    for source in ("forward", "inversion"):
        with pytest.raises(ValueError, match=f"--latent_source {source} cannot train from it"):
            train_inpo.parse_args(
                tiny_run_args("m", "d", str(tmp_path), inversion_cache_dir="c", latent_source=source)
            )
    with pytest.raises(ValueError, match="needs --inversion_cache_dir"):
        train_inpo.parse_args(tiny_run_args("m", "d", str(tmp_path), precompute_inversion_cache=True))
    with pytest.raises(ValueError, match="--cache_draws_per_pair must be at least 1"):
        train_inpo.parse_args(tiny_run_args("m", "d", str(tmp_path), inversion_cache_dir="c", cache_draws_per_pair=0))


def test_a_cached_step_is_one_policy_forward_with_grad_and_none_without(tiny_sd, pickapic, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    launch(
        "train_inpo.py",
        *tiny_run_args(tiny_sd, pickapic, out, precompute_inversion_cache=True, inversion_cache_dir=cache),
    )
    calls, original = [], UNet2DConditionModel.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting_forward)
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=3, inversion_cache_dir=cache))
    assert "a step is one policy forward and backward" in result.stderr
    assert calls == [True, True, True]  # 3 steps: the policy's forward each, no reference or inversion forward
    assert sorted(read_scalars(out, "loss")) == [1, 2, 3]


def test_a_run_longer_than_the_cached_draws_says_so(tiny_sd, pickapic, tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    flags = {"inversion_cache_dir": cache, "train_batch_size": 4}  # 8 pairs: 2 steps an epoch
    launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, precompute_inversion_cache=True, **flags))
    result = launch("train_inpo.py", *tiny_run_args(tiny_sd, pickapic, out, steps=4, **flags))
    assert "takes 2 epochs over the cache, which holds 1 draw(s)" in result.stderr
    assert "--cache_draws_per_pair 2" in result.stderr
