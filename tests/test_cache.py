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
        "latent_source": "inversion",
        "inversion_eta": 0.0,
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


@pytest.mark.parametrize(
    "latent_source, cache_timesteps",
    [("inversion", "grid"), ("inversion", "per_pair"), ("inverted_noise", "none")],
)
def test_round_trip_reads_back_what_was_computed(tiny_sd, pickapic, tmp_path, latent_source, cache_timesteps):
    args = cache_args(
        tiny_sd, pickapic, str(tmp_path / "cache"), latent_source=latent_source, cache_timesteps=cache_timesteps
    )
    recorded = []
    _, scheduler_config, _ = precompute_in_process(args, record=recorded)
    computed = {name: torch.cat([rows[name] for rows in recorded]) for name in recorded[0]}
    fingerprint = inpo_utils.cache_fingerprint(args, scheduler_config, False)
    manifest = inpo_utils.read_cache_manifest(args.inversion_cache_dir, fingerprint)
    assert manifest["num_pairs"] == 8 and manifest["num_shards"] == 3
    pairs = inpo_utils.CachedPairs(args.inversion_cache_dir, manifest, args.inversion_endpoint, seed=0)
    assert len(pairs) == 8
    for index in range(8):
        example = pairs[index]
        torch.testing.assert_close(example["x0"], computed["x0"][index])
        torch.testing.assert_close(example["encoder_hidden_states"], computed["encoder_hidden_states"][index])
        if cache_timesteps == "none":  # the inverted noise alone: no timestep, no e_ref
            assert set(example) == {"x0", "noise", "encoder_hidden_states"}
            torch.testing.assert_close(example["noise"], computed["noise"][index])
        elif cache_timesteps == "per_pair":
            assert example["timestep"] == computed["timesteps"][index]
            torch.testing.assert_close(example["latents"], computed["latents"][index])
            torch.testing.assert_close(example["reference_errors"], computed["reference_errors"][index])
        else:
            k = manifest["grid_timesteps"].index(int(example["timestep"]))
            expected = computed["x0"][index] if k == 0 else computed["latents"][index][:, k - 1]  # grid endpoint
            torch.testing.assert_close(example["latents"], expected)
            torch.testing.assert_close(example["reference_errors"], computed["reference_errors"][index][:, k])
    bytes_per_pair = manifest["bytes_per_pair"]
    assert bytes_per_pair == pytest.approx(sum(os.path.getsize(p) for p in pairs.shards) / 8)


@pytest.mark.parametrize(
    "endpoint, latent_source, cache_timesteps, fresh_noise_mix",
    [
        ("grid", "inversion", "grid", 0.0),
        ("exact", "inversion", "grid", 0.0),
        ("exact", "inverted_noise", "grid", 0.0),
        ("exact", "inverted_noise", "per_pair", 0.0),
        # Fresh noise mixed into the cached noise: t drawn and e_ref recomputed as online, with the same generator.
        ("exact", "inverted_noise", "per_pair", 0.5),
        ("exact", "inverted_noise", "none", 0.5),
    ],
)
def test_cached_loss_equals_online_loss_with_reference_inversion(
    tiny_sd, pickapic, tmp_path, endpoint, latent_source, cache_timesteps, fresh_noise_mix
):
    from peft import LoraConfig

    args = cache_args(
        tiny_sd,
        pickapic,
        str(tmp_path / "cache"),
        inversion_endpoint=endpoint,
        latent_source=latent_source,
        cache_timesteps=cache_timesteps,
        fresh_noise_mix=fresh_noise_mix,
    )
    accelerator, scheduler_config, unet = precompute_in_process(args)
    manifest = inpo_utils.read_cache_manifest(
        args.inversion_cache_dir, inpo_utils.cache_fingerprint(args, scheduler_config, False)
    )
    pairs = inpo_utils.CachedPairs(args.inversion_cache_dir, manifest, endpoint, seed=0)
    batch = inpo_utils.collate_cached([pairs[i] for i in range(4)])

    # A policy that differs from the reference: LoRA with non-zero up weights; reference = adapters off.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    reference = inpo_utils.AdaptersDisabled(unet)
    inverse_scheduler = inpo_utils.make_inverse_scheduler(scheduler_config, args.inversion_steps)
    cached_loss, cached_metrics = train_inpo.compute_cached_loss(
        batch, unet, reference, inverse_scheduler, args, accelerator, torch.Generator().manual_seed(1)
    )
    online_loss, online_metrics = inpo_utils.inpo_step_loss(
        unet,
        reference,
        reference,
        batch["x0"],
        batch["encoder_hidden_states"],
        inverse_scheduler,
        args.beta_dpo,
        latent_source=latent_source,
        eta=0.0,
        endpoint=endpoint,
        timesteps=None if fresh_noise_mix else batch["timesteps"],
        generator=torch.Generator().manual_seed(1),
        fresh_noise_mix=fresh_noise_mix,
    )
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=1e-4, abs=1e-6)
    for name in ("reference_mse", "policy_mse", "reward_margin"):
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
    assert "inversion_steps: cache has 10, this run has 20" in str(error.value)
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
    flags = {"inversion_cache_dir": cache}  # the defaults: inverted noise, fresh noise mixed in, a noise-only cache
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
    with pytest.raises(ValueError, match="cannot train --latent_source forward"):
        train_inpo.parse_args(tiny_run_args("m", "d", str(tmp_path), inversion_cache_dir="c", latent_source="forward"))
    with pytest.raises(ValueError, match="drop --inversion_model policy"):
        train_inpo.parse_args(
            tiny_run_args("m", "d", str(tmp_path), inversion_cache_dir="c", inversion_model="policy")
        )
    with pytest.raises(ValueError, match="cannot be cached"):
        train_inpo.parse_args(tiny_run_args("m", "d", str(tmp_path), inversion_cache_dir="c", latent_source="hybrid"))
    with pytest.raises(ValueError, match="needs --inversion_cache_dir"):
        train_inpo.parse_args(tiny_run_args("m", "d", str(tmp_path), precompute_inversion_cache=True))


def test_fresh_noise_needs_a_noise_cache_and_the_reference():
    x0 = torch.zeros(2, 4, 8, 8)
    args = (None, x0, x0, torch.zeros(1), torch.zeros(2, 3, 8), torch.zeros(2), torch.ones(1000), "epsilon", 1.0)
    with pytest.raises(ValueError, match="needs an inverted-noise cache"):
        inpo_utils.cached_step_loss(*args, fresh_noise_mix=0.5, reference_unet=object())
    with pytest.raises(ValueError, match="the `reference_unet`"):
        inpo_utils.cached_step_loss(*args[:2], None, *args[3:], noise=x0, fresh_noise_mix=0.5)
    with pytest.raises(ValueError, match="stores no reference errors"):  # a noise-only cache without the mix
        inpo_utils.cached_step_loss(*args[:5], None, *args[6:], noise=x0)


class RecordingUNet(torch.nn.Module):
    """Predicts zeros and records the timesteps it is called with."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, latents, timesteps, encoder_hidden_states):
        self.seen.append(timesteps.clone())
        return type("Output", (), {"sample": torch.zeros_like(latents)})()


def test_fresh_noise_from_the_cache_draws_t_in_the_timestep_range():
    policy, reference = RecordingUNet(), RecordingUNet()
    x0, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    stored_timesteps, stored_errors = torch.full((4,), 3), torch.full((8,), 123.0)
    for seed in range(5):
        _, metrics = inpo_utils.cached_step_loss(
            policy,
            x0,
            None,
            stored_timesteps,
            torch.zeros(8, 3, 8),
            stored_errors,
            torch.linspace(0.99, 0.01, 1000),
            "epsilon",
            1.0,
            noise=noise,
            fresh_noise_mix=0.5,
            reference_unet=reference,
            generator=torch.Generator().manual_seed(seed),
            timestep_range=(600, 700),
        )
    drawn = torch.cat(policy.seen)
    assert ((drawn >= 600) & (drawn < 700)).all() and len(drawn.unique()) > 1
    assert all(torch.equal(p, r) for p, r in zip(policy.seen, reference.seen))  # e_ref recomputed at the same t
    assert metrics["reference_mse"].item() != 123.0
