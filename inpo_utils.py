"""Shared pieces of the InPO training scripts: DDIM inversion, the implied-noise target and the InPO loss.

Notation (see README "How InPO works"): x0 are VAE latents, t a training timestep, alphas_cumprod[t] is ᾱ_t.
A batch of B preference pairs is laid out as 2B rows, winners first: rows [0, B) are the preferred images and
rows [B, 2B) the rejected ones, and row i and row B + i share their caption and their timestep.
"""

import argparse
import dataclasses
import functools
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
INVERSION_ENDPOINTS = ("grid", "exact")
LATENT_SOURCES = ("inversion", "forward", "inverted_noise")
NOISE_X0_PROJECTIONS = ("none", "remove")


# --------------------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------------------


def make_inverse_scheduler(scheduler_config, num_inversion_steps):
    """A `DDIMInverseScheduler` on the model's own noise schedule with a `num_inversion_steps`-point grid.

    The grid follows the model's `timestep_spacing`/`steps_offset` (SD 1.5: 1, 101, ..., 901 for 10 steps), which
    is what the InPO authors invert on.
    """
    scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    if scheduler.config.prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"The model's scheduler predicts {scheduler.config.prediction_type!r}; InPO supports "
            f"{SUPPORTED_PREDICTION_TYPES}. Use an epsilon or v-prediction checkpoint."
        )
    scheduler.set_timesteps(num_inversion_steps)
    return scheduler


def ddim_inverse_step(sample, model_output, alpha_prod_from, alpha_prod_to, prediction_type="epsilon",
                      clip_sample_range=None):  # fmt: skip
    """One deterministic DDIM step from noise level ᾱ_from to ᾱ_to (either direction).

    x_to = √ᾱ_to · x̂0 + √(1 − ᾱ_to) · ε̂, with (x̂0, ε̂) read off the model output at the source level ᾱ_from, as
    diffusers' `DDIMInverseScheduler.step` does. `clip_sample_range`, if set, clips x̂0 (not ε̂), also as diffusers.

    Args:
        sample: (N, C, H, W) latents at level ᾱ_from.
        model_output: (N, C, H, W) UNet output in its `prediction_type` parameterisation.
        alpha_prod_from, alpha_prod_to: scalars or (N,) tensors.
    Returns:
        (N, C, H, W) latents at level ᾱ_to.
    """
    a_from = _per_sample(alpha_prod_from, sample)
    a_to = _per_sample(alpha_prod_to, sample)
    if prediction_type == "epsilon":
        pred_epsilon = model_output
        pred_x0 = (sample - (1 - a_from).sqrt() * pred_epsilon) / a_from.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = a_from.sqrt() * sample - (1 - a_from).sqrt() * model_output
        pred_epsilon = a_from.sqrt() * model_output + (1 - a_from).sqrt() * sample
    else:
        raise ValueError(f"prediction_type must be one of {SUPPORTED_PREDICTION_TYPES}, got {prediction_type!r}")
    if clip_sample_range is not None:
        pred_x0 = pred_x0.clamp(-clip_sample_range, clip_sample_range)
    return a_to.sqrt() * pred_x0 + (1 - a_to).sqrt() * pred_epsilon


def inversion_noise_std(alphas_cumprod, landed_timesteps, step_size):
    """σ(τ+Δ, τ): std of the DDIM/DDPM posterior between grid point τ and the next one, τ+Δ.

    σ² = (1 − ᾱ_τ)/(1 − ᾱ_{τ+Δ}) · (1 − ᾱ_{τ+Δ}/ᾱ_τ), as `DDIMScheduler._get_variance(τ+Δ, τ)`. The InPO authors
    add `eta · σ · N(0, I)` after each inverse step that lands on τ. τ+Δ is clamped to the last timestep T−1 (the
    authors' code indexes past the schedule there).

    Args:
        alphas_cumprod: (T,) ᾱ of the noise schedule.
        landed_timesteps: (N,) long, the timesteps τ just reached.
    Returns:
        (N,) float std.
    """
    num_train_timesteps = alphas_cumprod.shape[0]
    alpha_here = alphas_cumprod[landed_timesteps]
    alpha_next = alphas_cumprod[(landed_timesteps + step_size).clamp(max=num_train_timesteps - 1)]
    variance = (1 - alpha_here) / (1 - alpha_next) * (1 - alpha_next / alpha_here)
    return variance.clamp(min=0).sqrt()


def ddim_invert(unet, x0, timesteps, encoder_hidden_states, inverse_scheduler, eta=0.0, endpoint="grid",
                generator=None, added_cond_kwargs=None, return_trajectory=False):  # fmt: skip
    """Run DDIM inversion of clean latents `x0` up to (about) timestep `timesteps[i]`, per sample, without grad.

    For each grid point τ of `inverse_scheduler` with τ < t, the latents move from level τ−Δ (or the scheduler's
    initial ᾱ for the first step) to level τ with the UNet evaluated at τ: the `DDIMInverseScheduler.step`
    convention. After each step, if eta > 0, `eta · σ(τ+Δ, τ) · N(0, I)` is added (`inversion_noise_std`).

    endpoint="grid" (the InPO authors' behaviour) stops at the last grid point below t, so the returned latent sits
    at level τ_last, not t. endpoint="exact" takes one more partial step from τ_last to t (UNet at t), so the
    returned latent is at level t.

    Args:
        unet: a `UNet2DConditionModel` (or anything called the same way returning `.sample`).
        x0: (N, C, H, W) clean latents.
        timesteps: (N,) long target timesteps t.
        encoder_hidden_states: (N, L, D) text conditioning.
        inverse_scheduler: from `make_inverse_scheduler`.
        added_cond_kwargs: optional dict of (N, ...) tensors (SDXL's `text_embeds`, `time_ids`).
        return_trajectory: also return the latents after every grid step (the inversion cache stores them).
    Returns:
        (N, C, H, W) float32 inverted latents; with return_trajectory, also (K, N, C, H, W): entry k is the latent
        after the step onto grid point k (rows whose t is not above it keep their previous latent).
    """
    if endpoint not in INVERSION_ENDPOINTS:
        raise ValueError(f"endpoint must be one of {INVERSION_ENDPOINTS}, got {endpoint!r}")
    config = inverse_scheduler.config
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device, torch.float32)
    initial_alpha = inverse_scheduler.initial_alpha_cumprod.to(x0.device, torch.float32)
    step_size = config.num_train_timesteps // inverse_scheduler.num_inference_steps
    clip_range = config.clip_sample_range if config.clip_sample else None
    timesteps = timesteps.to(x0.device).long()
    added_cond_kwargs = added_cond_kwargs or {}

    def predict(latents, step_timesteps, rows):
        subset_kwargs = {k: v[rows] for k, v in added_cond_kwargs.items()}
        model_kwargs = {"added_cond_kwargs": subset_kwargs} if subset_kwargs else {}
        out = unet(latents.to(unet.dtype), step_timesteps, encoder_hidden_states[rows], **model_kwargs).sample
        return out.float()

    def add_noise(latents, landed):
        if eta == 0:
            return latents
        std = inversion_noise_std(alphas_cumprod, landed, step_size)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return latents + eta * _per_sample(std, latents) * noise

    latents = x0.float().clone()
    landed = torch.full_like(timesteps, -1)  # -1: still at x0
    trajectory = []
    with torch.no_grad():
        for grid_point in inverse_scheduler.timesteps.tolist():
            rows = (timesteps > grid_point).nonzero().flatten()
            if rows.numel() == 0:
                continue
            source = grid_point - step_size
            alpha_from = alphas_cumprod[source] if source >= 0 else initial_alpha
            step_timesteps = torch.full((rows.numel(),), grid_point, device=x0.device, dtype=torch.long)
            model_output = predict(latents[rows], step_timesteps, rows)
            moved = ddim_inverse_step(latents[rows], model_output, alpha_from, alphas_cumprod[grid_point],
                                      config.prediction_type, clip_range)  # fmt: skip
            latents[rows] = add_noise(moved, step_timesteps)
            landed[rows] = grid_point
            if return_trajectory:
                trajectory.append(latents.clone())

        if endpoint == "exact":
            alpha_from = torch.where(landed >= 0, alphas_cumprod[landed.clamp(min=0)], initial_alpha)
            all_rows = torch.arange(len(timesteps), device=x0.device)
            model_output = predict(latents, timesteps, all_rows)
            moved = ddim_inverse_step(latents, model_output, alpha_from, alphas_cumprod[timesteps],
                                      config.prediction_type, clip_range)  # fmt: skip
            latents = add_noise(moved, timesteps)
    if return_trajectory:
        return latents, torch.stack(trajectory) if trajectory else latents.new_zeros((0, *latents.shape))
    return latents


# --------------------------------------------------------------------------------------------------------------
# Targets and loss
# --------------------------------------------------------------------------------------------------------------


def implied_noise(x_inv, x0, timesteps, alphas_cumprod):
    """ε* = (x_inv − √ᾱ_t · x0) / √(1 − ᾱ_t): the noise that the forward process would need to reach x_inv at t.

    Args: x_inv, x0 (N, C, H, W); timesteps (N,) long; alphas_cumprod (T,). Returns (N, C, H, W).
    """
    a_t = _per_sample(alphas_cumprod.to(x0.device)[timesteps], x0)
    return (x_inv - a_t.sqrt() * x0) / (1 - a_t).sqrt()


def remove_x0_component(noise, x0):
    """ε − (⟨ε, x0⟩ / ⟨x0, x0⟩) · x0 per sample, inner products over (C, H, W): the part of ε orthogonal to x0.

    Inverted noise carries the image itself (its border brightness correlates with x0's); regressing on that part
    teaches the model to predict the preferred content as noise, which sampling then subtracts. Rows with x0 = 0
    are returned unchanged. Args: noise, x0 (N, C, H, W). Returns (N, C, H, W).
    """
    dims = list(range(1, x0.ndim))
    x0 = x0.to(noise.dtype)
    norm = (x0 * x0).sum(dim=dims, keepdim=True)
    coefficient = (noise * x0).sum(dim=dims, keepdim=True) / norm.clamp(min=torch.finfo(noise.dtype).tiny)
    return noise - coefficient * x0


def standardise(noise):
    """Zero mean and unit std per sample over (C, H, W), so it can stand in for N(0, I) noise at any level.

    Inverted noise is far narrower than forward noise (std ~0.3-0.5 on the benchmark's images). Args: (N, C, H, W).
    Returns (N, C, H, W).
    """
    dims = list(range(1, noise.ndim))
    centred = noise - noise.mean(dim=dims, keepdim=True)
    return centred / centred.std(dim=dims, keepdim=True).clamp(min=1e-12)


def mix_fresh_noise(noise, fresh, mix):
    """√(1 − λ) · ε + √λ · ξ: unit variance when ε and ξ are independent with unit variance. λ = `mix` in [0, 1].

    Args: noise, fresh (N, C, H, W). Returns (N, C, H, W).
    """
    return math.sqrt(1 - mix) * noise + math.sqrt(mix) * fresh


def forward_noised(x0, noise, timesteps, alphas_cumprod):
    """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε. Args: x0, noise (N, C, H, W); timesteps (N,). Returns (N, C, H, W)."""
    a_t = _per_sample(alphas_cumprod.to(x0.device)[timesteps], noise)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def inverted_noise(inversion_unet, x0, encoder_hidden_states, inverse_scheduler, x0_projection="remove", eta=0.0,
                   added_cond_kwargs=None, generator=None):  # fmt: skip
    """The noise DDIM inversion assigns to each image: invert x0 to the last grid point τ_K and take its implied
    noise ε_T; with x0_projection="remove" take out its x0 component (`remove_x0_component`); then `standardise`.

    The reparametrized-DDIM reading of InPO: one noise per image (independent of t, so it can be computed once),
    used like Diffusion-DPO's ε at any t. Args: x0 (N, C, H, W), encoder_hidden_states (N, L, D). Returns
    (N, C, H, W) float32.
    """
    if x0_projection not in NOISE_X0_PROJECTIONS:
        raise ValueError(f"x0_projection must be one of {NOISE_X0_PROJECTIONS}, got {x0_projection!r}")
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    last = torch.full((len(x0),), int(inverse_scheduler.timesteps[-1]), device=x0.device, dtype=torch.long)
    # "exact" onto the last grid point is the full grid inversion: its final step is the grid step onto τ_K.
    x_inv = ddim_invert(inversion_unet, x0, last, encoder_hidden_states, inverse_scheduler, eta=eta, endpoint="exact",
                        generator=generator, added_cond_kwargs=added_cond_kwargs)  # fmt: skip
    noise = implied_noise(x_inv, x0.float(), last, alphas_cumprod)
    if x0_projection == "remove":
        noise = remove_x0_component(noise, x0.float())
    return standardise(noise)


def v_prediction_target(noise, x0, timesteps, alphas_cumprod):
    """v* = √ᾱ_t · ε − √(1 − ᾱ_t) · x0. Args: noise, x0 (N, C, H, W); timesteps (N,). Returns (N, C, H, W)."""
    a_t = _per_sample(alphas_cumprod.to(x0.device)[timesteps], x0)
    return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0


def regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type):
    """The UNet's regression target for noise `noise` in its own parameterisation (ε or v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_prediction_target(noise, x0, timesteps, alphas_cumprod)
    raise ValueError(f"prediction_type must be one of {SUPPORTED_PREDICTION_TYPES}, got {prediction_type!r}")


def per_sample_mse(prediction, target):
    """e = mean over (C, H, W) of (prediction − target)², in float32. (N, C, H, W) → (N,)."""
    return (prediction.float() - target.float()).pow(2).mean(dim=list(range(1, prediction.ndim)))


def inpo_loss(policy_error_w, policy_error_l, reference_error_w, reference_error_l, beta):
    """The InPO (Diffusion-DPO form) loss on B pairs.

    inside = −½·β·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)],  loss = mean(−log σ(inside)).

    `inside` is also the implicit reward margin r_w − r_l with r = −½·β·(e_θ − e_ref). Accuracy counts
    inside > 0 as 1 and a tie (inside == 0) as ½.

    Args: four (B,) per-sample errors from `per_sample_mse`; beta a float.
    Returns: (loss, metrics) with loss a scalar tensor (with grad through the policy errors) and metrics a dict
    of float scalar tensors: loss, implicit_acc, reward_margin, policy_mse, reference_mse (means over all 2B rows).
    """
    policy_diff = policy_error_w - policy_error_l
    reference_diff = reference_error_w - reference_error_l
    inside = -0.5 * beta * (policy_diff - reference_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        accuracy = (inside > 0).float() + 0.5 * (inside == 0).float()
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": accuracy.mean(),
            "reward_margin": inside.mean(),
            "policy_mse": torch.cat([policy_error_w, policy_error_l]).mean(),
            "reference_mse": torch.cat([reference_error_w, reference_error_l]).mean(),
        }
    return loss, metrics


def _per_sample(value, like):
    """Broadcast a scalar or (N,) tensor against (N, ...) `like`."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value


# --------------------------------------------------------------------------------------------------------------
# One training step, shared by both scripts
# --------------------------------------------------------------------------------------------------------------


class AdaptersDisabled:
    """Calls a peft-adapted UNet with its LoRA adapters switched off, so one UNet in memory is also the reference."""

    def __init__(self, unet):
        self.unet = unet

    @property
    def dtype(self):
        return self.unet.dtype

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def pair_shared_noise(x0, generator=None):
    """N(0, I) noise for 2B rows laid out winners first, the same draw for both images of a pair (Diffusion-DPO).

    Args: x0 (2B, C, H, W), only for its shape and device. Returns (2B, C, H, W) float32.
    """
    half = torch.randn(x0[: len(x0) // 2].shape, generator=generator, device=x0.device)
    return half.repeat(2, 1, 1, 1)


def source_latents(x0, timesteps, latent_source, inversion_unet, encoder_hidden_states, inverse_scheduler,
                   alphas_cumprod, eta=0.0, endpoint="grid", added_cond_kwargs=None, generator=None,
                   x0_projection="remove", fresh_noise_mix=0.0):  # fmt: skip
    """The noisy latents the loss is scored at and the noise they imply, for 2B rows laid out winners first.

    latent_source="inversion" (InPO): DDIM inversion of x0 up to t, target ε* = implied noise.
    latent_source="forward" (Diffusion-DPO): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε with one ε shared by both images of a pair.
    latent_source="inverted_noise": the same forward formula with each image's own `inverted_noise` ε' (x0 part
    handled by `x0_projection`), mixed with a share `fresh_noise_mix` of pair-shared fresh noise
    (`mix_fresh_noise`). `endpoint` does not apply: the inversion always runs to the last grid point.

    Returns: (latents (2B, C, H, W) float32, noise (2B, C, H, W) float32).
    """
    if latent_source == "inversion":
        x_inv = ddim_invert(inversion_unet, x0, timesteps, encoder_hidden_states, inverse_scheduler, eta=eta,
                            endpoint=endpoint, generator=generator, added_cond_kwargs=added_cond_kwargs)  # fmt: skip
        return x_inv, implied_noise(x_inv, x0.float(), timesteps, alphas_cumprod)
    if latent_source == "forward":
        noise = pair_shared_noise(x0, generator)
        return forward_noised(x0.float(), noise, timesteps, alphas_cumprod), noise
    if latent_source == "inverted_noise":
        noise = inverted_noise(inversion_unet, x0, encoder_hidden_states, inverse_scheduler, x0_projection, eta,
                               added_cond_kwargs, generator)  # fmt: skip
        if fresh_noise_mix > 0:
            noise = mix_fresh_noise(noise, pair_shared_noise(x0, generator), fresh_noise_mix)
        return forward_noised(x0.float(), noise, timesteps, alphas_cumprod), noise
    raise ValueError(f"latent_source must be one of {LATENT_SOURCES}, got {latent_source!r}")


def reference_errors_at(reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    """e_ref per row: the frozen reference's error at (latents, t, c), without grad. Shapes as `score_pairs`."""
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    with torch.no_grad():
        prediction = reference_unet(latents.to(reference_unet.dtype), timesteps, encoder_hidden_states,
                                    **model_kwargs).sample  # fmt: skip
    return per_sample_mse(prediction, target)


def score_pairs(policy_unet, latents, target, timesteps, encoder_hidden_states, reference_errors, beta,
                added_cond_kwargs=None):  # fmt: skip
    """The policy's errors at (latents, t, c) against `target`, turned into the InPO loss with e_ref.

    Args: latents, target (2B, C, H, W) winners first; timesteps (2B,); encoder_hidden_states (2B, L, D);
    reference_errors (2B,). Returns (loss, metrics) as `inpo_loss`, metrics also holding the mean timestep.
    """
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    policy_errors = per_sample_mse(policy_unet(latents, timesteps, encoder_hidden_states, **model_kwargs).sample,
                                   target)  # fmt: skip
    loss, metrics = inpo_loss(*policy_errors.chunk(2), *reference_errors.to(policy_errors).chunk(2), beta)
    metrics["timestep"] = timesteps.float().mean()
    return loss, metrics


def inpo_step_loss(policy_unet, reference_unet, inversion_unet, x0, encoder_hidden_states, inverse_scheduler, beta,
                   latent_source="inversion", eta=0.0, endpoint="grid", added_cond_kwargs=None, timesteps=None,
                   generator=None, x0_projection="remove", fresh_noise_mix=0.0):  # fmt: skip
    """Online InPO loss and metrics for B pairs: sample t, build the noisy latents, score policy against reference.

    Args:
        policy_unet: the trained UNet (called with grad).
        reference_unet: the frozen reference (called without grad).
        inversion_unet: the UNet that inverts (the policy for the authors' online InPO, or the reference).
        x0: (2B, C, H, W) latents, winners first. encoder_hidden_states: (2B, L, D).
        timesteps: optional (B,) per-pair timesteps; sampled uniformly from {0, ..., T−1} when None.
        latent_source, eta, endpoint, x0_projection, fresh_noise_mix: as `source_latents`.
    Returns: (loss, metrics) as `score_pairs`.
    """
    num_pairs = len(x0) // 2
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    if timesteps is None:
        timesteps = torch.randint(0, inverse_scheduler.config.num_train_timesteps, (num_pairs,), device=x0.device,
                                  generator=generator)  # fmt: skip
    timesteps = timesteps.to(x0.device).long().repeat(2)
    latents, noise = source_latents(x0, timesteps, latent_source, inversion_unet, encoder_hidden_states,
                                    inverse_scheduler, alphas_cumprod, eta, endpoint, added_cond_kwargs, generator,
                                    x0_projection, fresh_noise_mix)  # fmt: skip
    target = regression_target(noise, x0.float(), timesteps, alphas_cumprod, inverse_scheduler.config.prediction_type)
    reference_errors = reference_errors_at(reference_unet, latents, target, timesteps, encoder_hidden_states,
                                           added_cond_kwargs)  # fmt: skip
    return score_pairs(policy_unet, latents, target, timesteps, encoder_hidden_states, reference_errors, beta,
                       added_cond_kwargs)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Preference data (Pick-a-Pic v2 layout: caption, jpg_0, jpg_1, label_0)
# --------------------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def find_problem(caption, image_bytes_0, image_bytes_1):
    """Why a row can't be trained on ("" if it can): unreadable image headers, zero-size images, empty captions.

    Only the image headers are parsed here (cheap); a body that fails to decode later is dropped in `collate_pairs`.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    for name, data in (("jpg_0", image_bytes_0), ("jpg_1", image_bytes_1)):
        if not data:
            return f"{name} has no bytes"
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width == 0 or image.height == 0:
                    return f"{name} is zero-size"
        except (UnidentifiedImageError, OSError, ValueError) as error:
            return f"{name} does not decode ({type(error).__name__})"
    return ""


def check_pair_columns(dataset_name, column_names):
    missing = [column for column in PAIR_COLUMNS if column not in column_names]
    if missing:
        raise ValueError(f"Dataset {dataset_name!r} lacks the column(s) {missing}; found {column_names}. "
                         f"InPO needs Pick-a-Pic v2 columns {list(PAIR_COLUMNS)}: caption (str), jpg_0/jpg_1 "
                         "(encoded image bytes), label_0 (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie).")  # fmt: skip


def check_labels(labels):
    bad_labels = sorted({label for label in labels if label not in (0, 0.5, 1)}, key=str)
    if bad_labels:
        raise ValueError(f"label_0 must be 0, 0.5 or 1; found {bad_labels[:5]}.")


def load_split(dataset_name, split, cache_dir, streaming=False):
    import datasets

    try:
        return datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir, streaming=streaming)
    except ValueError as error:
        raise ValueError(f"Could not load split {split!r} of {dataset_name!r}: {error}. Pass the split that holds "
                         "your pairs with --dataset_split_name (local parquet folders: the file name prefix, "
                         "e.g. train-*.parquet is split 'train').") from error  # fmt: skip


def load_preference_dataset(dataset_name, split, cache_dir=None, max_train_samples=None, seed=None, log=print):
    """Load a Pick-a-Pic-format dataset (hub id or local folder of parquet files), validate it, drop ties and
    unusable rows, and return it. Runs before any model is loaded, so a bad dataset fails in seconds.
    """
    dataset = load_split(dataset_name, split, cache_dir)
    check_pair_columns(dataset_name, dataset.column_names)
    dataset = dataset.select_columns(list(PAIR_COLUMNS))
    labels = dataset["label_0"]
    check_labels(labels)
    decided = [i for i, label in enumerate(labels) if label in (0, 1)]
    num_ties = len(labels) - len(decided)
    dataset = dataset.select(decided)
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))

    problems = [] if len(dataset) == 0 else dataset.map(
        lambda batch: {"problem": [find_problem(*row) for row in zip(batch["caption"], batch["jpg_0"], batch["jpg_1"])]},
        batched=True, remove_columns=dataset.column_names, desc="Checking pairs",
    )["problem"]  # fmt: skip
    skipped = [(i, problem) for i, problem in enumerate(problems) if problem]
    dataset = dataset.select([i for i, problem in enumerate(problems) if not problem])
    reasons = {}
    for _, problem in skipped:
        reasons[problem] = reasons.get(problem, 0) + 1
    log(f"Dataset {dataset_name!r} [{split}]: {len(dataset)} pairs kept, {num_ties} ties dropped, "
        f"{len(skipped)} rows skipped {reasons or ''}".rstrip())  # fmt: skip
    if skipped:
        log("First skipped rows (index after dropping ties): " + ", ".join(f"{i}: {p}" for i, p in skipped[:5]))
    if len(dataset) == 0:
        raise ValueError(f"No usable preference pairs in {dataset_name!r} [{split}] ({num_ties} ties, "
                         f"{len(skipped)} bad rows). Check label_0 and the image bytes.")  # fmt: skip
    return dataset


def resize_and_crop(image, resolution, crop_fraction=(0.5, 0.5), flip=False):
    """Resize the short side to `resolution` (bilinear), crop a square, optionally flip; map to [−1, 1].

    crop_fraction (0.5, 0.5) is a centre crop; random crops pass uniform fractions. Returns
    (pixels (3, R, R) float32, original_size (h, w), crop_top_left (top, left)) — the last two are SDXL's
    micro-conditioning, measured in the resized image as diffusers' SDXL training scripts do.
    """
    from PIL import Image

    image = image.convert("RGB")
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.BILINEAR)
    top = round((image.height - resolution) * crop_fraction[0])
    left = round((image.width - resolution) * crop_fraction[1])
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, original_size, (top, left)


class PreferencePairs(torch.utils.data.Dataset):
    """Decoded, transformed pairs with the preferred image first.

    Each index draws its crop and flip from its own generator seeded by (seed, epoch, index), so a resumed run sees
    the same augmentation as an uninterrupted one; both images of a pair share the flip and crop fractions.
    """

    def __init__(self, dataset, resolution, random_crop=False, hflip=True, seed=0):
        self.dataset = dataset
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = seed or 0
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return transform_pair(self.dataset[index], index, self.resolution, rng, self.random_crop, self.hflip)


def transform_pair(row, index, resolution, rng, random_crop, hflip):
    """A decided Pick-a-Pic row → the example `collate_pairs` batches (preferred image first), or None when an
    image body does not decode. Both images share the crop fractions and the flip drawn from `rng`."""
    from PIL import Image

    crop_fraction = tuple(rng.uniform(size=2)) if random_crop else (0.5, 0.5)
    flip = hflip and bool(rng.integers(2))
    preferred, rejected = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")
    try:
        images = [Image.open(io.BytesIO(row[name])) for name in (preferred, rejected)]
        transformed = [resize_and_crop(image, resolution, crop_fraction, flip) for image in images]
    except (OSError, ValueError) as error:
        logging.getLogger(__name__).warning(f"Skipping pair {index}: image does not decode ({error}).")
        return None
    return {
        "index": index,
        "caption": row["caption"],
        "pixel_values": torch.stack([t[0] for t in transformed]),
        "original_sizes": torch.tensor([t[1] for t in transformed]),
        "crop_top_lefts": torch.tensor([t[2] for t in transformed]),
    }


def load_preference_stream(dataset_name, split, cache_dir, shuffle_buffer_size, seed, process_index, num_processes):
    """This process's share of a streamed Pick-a-Pic-format dataset, shuffled through a buffer (--streaming).

    Nothing is downloaded up front; the columns and the first row are checked now so a wrong dataset fails in
    seconds. `datasets.distributed.split_dataset_by_node` gives each process whole parquet shards when their
    number divides evenly, otherwise every num_processes-th row; the shuffle (seeded, reshuffled by `set_epoch`)
    is identical on every process, so the shares partition each epoch.
    """
    from datasets.distributed import split_dataset_by_node

    stream = load_split(dataset_name, split, cache_dir, streaming=True)
    first = next(iter(stream), None)
    if first is None:
        raise ValueError(f"Split {split!r} of {dataset_name!r} is empty.")
    check_pair_columns(dataset_name, stream.column_names or list(first))
    stream = stream.select_columns(list(PAIR_COLUMNS)).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return split_dataset_by_node(stream, rank=process_index, world_size=num_processes)


class StreamingPairs(torch.utils.data.IterableDataset):
    """Transformed pairs from this process's share of a stream, epoch after epoch without end: a streaming run is
    measured in --max_train_steps, and no process may run dry before the others (shares differ in size).

    Ties and unusable rows are dropped and counted as in the map-style path (`find_problem`, then decoding); each
    epoch ends with a log line of the counts. The position (epoch, rows read) of every process goes into
    checkpoints; a resumed run replays its share of the epoch up to that row without decoding the images, so it
    trains on the same pairs in the same order as an uninterrupted run.
    """

    def __init__(self, stream, resolution, random_crop, hflip, seed, accelerator):
        self.stream = stream
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = seed
        self.accelerator = accelerator
        self.epoch, self.rows_read = 0, 0

    def __iter__(self):
        logger = logging.getLogger(__name__)  # every process logs its own share's counts
        while True:
            self.stream.set_epoch(self.epoch)
            rows = iter(self.stream)
            resumed_at = self.rows_read
            for _ in range(resumed_at):  # resume: rows already trained on in this epoch
                next(rows)
            kept, dropped = 0, {}
            for row in rows:
                index = self.rows_read
                self.rows_read += 1
                check_labels([row["label_0"]])
                problem = "tie" if row["label_0"] == 0.5 else find_problem(row["caption"], row["jpg_0"], row["jpg_1"])
                if not problem:
                    rng = np.random.default_rng((self.seed, self.epoch, self.accelerator.process_index, index))
                    example = transform_pair(row, index, self.resolution, rng, self.random_crop, self.hflip)
                    problem = "image does not decode" if example is None else ""
                if problem:
                    dropped[problem] = dropped.get(problem, 0) + 1
                    continue
                kept += 1
                yield example
            ties = dropped.pop("tie", 0)
            logger.info(f"Streamed epoch {self.epoch} on process {self.accelerator.process_index} (from row "
                        f"{resumed_at}): {kept} pairs, {ties} ties dropped, {sum(dropped.values())} rows skipped "
                        f"{dropped or ''}".rstrip())  # fmt: skip
            if kept == 0 and resumed_at == 0:
                raise ValueError(f"Process {self.accelerator.process_index}'s share of the stream holds no usable "
                                 "pairs; check label_0 and the image bytes, or use fewer processes.")  # fmt: skip
            self.epoch, self.rows_read = self.epoch + 1, 0

    def state_dict(self):
        # Called on every process by save_state; only the main process writes, so it must hold all positions.
        position = torch.tensor([[self.epoch, self.rows_read]], device=self.accelerator.device)
        return {"positions": self.accelerator.gather(position).cpu()}

    def load_state_dict(self, state):
        positions = state["positions"]
        if len(positions) == self.accelerator.num_processes:
            self.epoch, self.rows_read = positions[self.accelerator.process_index].tolist()
            return
        # Another process count splits the stream differently: the saved positions mean nothing in the new shares.
        self.epoch, self.rows_read = int(positions[:, 0].min()), 0
        main_process_logger().warning(
            f"The checkpoint was written by {len(positions)} processes, this run has "
            f"{self.accelerator.num_processes}: the stream's shares differ, so its position within the epoch cannot "
            f"be restored. Restarting streamed epoch {self.epoch} from its beginning (pairs already trained on in "
            "it are seen again). Resume with the same number of processes to continue exactly."
        )  # fmt: skip


def collate_pairs(examples):
    """Batch B pairs as 2B rows, winners first. Pairs that failed to decode (None) are dropped."""
    examples = [example for example in examples if example is not None]
    if not examples:
        return None

    def winners_then_losers(key):
        stacked = torch.stack([example[key] for example in examples])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])

    return {
        "indices": torch.tensor([example["index"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "pixel_values": winners_then_losers("pixel_values").contiguous(),
        "original_sizes": winners_then_losers("original_sizes"),
        "crop_top_lefts": winners_then_losers("crop_top_lefts"),
    }


# --------------------------------------------------------------------------------------------------------------
# Command line shared by both scripts
# --------------------------------------------------------------------------------------------------------------

DEFAULT_VALIDATION_PROMPTS = [
    "portrait photo of a girl, photograph, highly detailed face, depth of field, moody light, golden hour",
    "a cute dragon made of wool, studio lighting",
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dawn",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' usage examples as written and shows every flag's default."""


def add_training_args(parser, default_beta, default_resolution, default_output_dir):
    """Flags both scripts share; names follow diffusers' train_diffusion_dpo*.py where the meaning is the same."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    group.add_argument("--revision", default=None, help="Model revision on the hub.")
    group.add_argument("--variant", default=None, help="Weight variant, e.g. fp16.")
    group.add_argument("--allow_unsafe_pickle_weights", action="store_true",
                       help="Also load .bin/.ckpt (pickle) weights; by default only safetensors are loaded, since "
                            "unpickling a file can run arbitrary code.")  # fmt: skip
    group.add_argument("--dataset_name", required=True,
                       help="Hub id (yuvalkirstain/pickapic_v2) or local folder of <split>-*.parquet files with "
                            "columns caption, jpg_0, jpg_1, label_0.")  # fmt: skip
    group.add_argument("--dataset_split_name", default="train")
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep this many pairs (after ties).")
    group.add_argument("--resolution", type=int, default=default_resolution)
    group.add_argument("--random_crop", action="store_true", help="Random instead of centre crops.")
    group.add_argument("--no_hflip", action="store_true", help="Do not flip pairs horizontally at random.")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="Fraction of captions replaced by '' (the InPO authors' script uses 0.2).")  # fmt: skip
    group.add_argument("--streaming", action="store_true",
                       help="Stream the dataset (datasets' streaming mode) instead of downloading it first, for "
                            "datasets larger than the disk; needs --max_train_steps.")  # fmt: skip
    group.add_argument("--shuffle_buffer_size", type=int, default=1000,
                       help="With --streaming: pairs held in memory to shuffle from (Pick-a-Pic: ~1 MB each).")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--vae_encode_batch_size", type=int, default=8, help="Images per VAE encode call.")

    group = parser.add_argument_group("InPO")
    group.add_argument("--beta_dpo", type=float, default=default_beta, help="β of the InPO/DPO loss.")
    group.add_argument("--inversion_steps", type=int, default=10, help="K: points of the DDIM inversion grid.")
    group.add_argument("--inversion_eta", type=float, default=None,
                       help="Std multiplier of the noise added after each inverse step; 0 = pure DDIM inversion. "
                            "Default: 0 with --latent_source inverted_noise (one fixed noise per image, as "
                            "measured), 0.1 with inversion (the authors).")  # fmt: skip
    group.add_argument("--inversion_endpoint", choices=INVERSION_ENDPOINTS, default="grid",
                       help="grid: stop at the last grid point below t (the paper); exact: finish on t.")  # fmt: skip
    group.add_argument("--inversion_model", choices=("policy", "reference"), default=None,
                       help="Which UNet inverts: the one being trained (the paper, online; the default with "
                            "--latent_source inversion) or the frozen reference (the default with inverted_noise, "
                            "and the only choice with --inversion_cache_dir).")  # fmt: skip
    group.add_argument("--latent_source", choices=LATENT_SOURCES, default="inverted_noise",
                       help="inverted_noise (default, chosen on the alignment benchmark): forward noising with each "
                            "image's own noise from one DDIM inversion to the last grid point (standardised; see "
                            "--noise_x0_projection). inversion: the paper's InPO, DDIM inversion up to t. forward: "
                            "Diffusion-DPO's forward noising, same loss (ablation).")  # fmt: skip
    group.add_argument("--noise_x0_projection", choices=NOISE_X0_PROJECTIONS, default="remove",
                       help="With --latent_source inverted_noise: remove: take the noise's component along x0 out "
                            "(the part that reverses the preference); none: keep it.")  # fmt: skip
    group.add_argument("--fresh_noise_mix", type=float, default=0.0,
                       help="With --latent_source inverted_noise: λ in [0, 1]; the noise is "
                            "√(1−λ)·inverted + √λ·fresh (fresh noise shared by a pair, as Diffusion-DPO's).")
    group.add_argument("--train_mode", choices=("lora", "full"), default="lora",
                       help="lora: train LoRA adapters, reference = adapters off. full: train the whole UNet "
                            "against a frozen copy (the paper).")  # fmt: skip
    group.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    group.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    group.add_argument("--lora_target_modules", default="to_k,to_q,to_v,to_out.0",
                       help="Comma-separated UNet module names that get LoRA adapters.")  # fmt: skip

    group = parser.add_argument_group("invert once: the inversion cache")
    group.add_argument("--inversion_cache_dir", default=None,
                       help="Train from this precomputed cache (no VAE, text encoders, reference or inversion per "
                            "step); with --precompute_inversion_cache, write it.")  # fmt: skip
    group.add_argument("--precompute_inversion_cache", action="store_true",
                       help="Invert the dataset once with the frozen reference and write --inversion_cache_dir, "
                            "then exit. Resumes an interrupted precompute.")  # fmt: skip
    group.add_argument("--cache_timesteps", choices=("grid", "per_pair"), default="grid",
                       help="grid: store the whole inversion trajectory, train on t drawn from the K grid points; "
                            "per_pair: store one uniformly drawn t per pair (K+1x smaller, fixed t).")  # fmt: skip
    group.add_argument("--cache_dtype", choices=tuple(CACHE_DTYPES), default="fp16")
    group.add_argument("--cache_shard_size", type=int, default=256, help="Pairs per cache shard.")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--output_dir", default=default_output_dir)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--train_batch_size", type=int, default=1, help="Pairs per device per micro-batch.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=1e-5)
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the lr by batch size x accumulation x processes (as the authors do).")
    group.add_argument("--lr_scheduler", default="constant",
                       help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                            '"constant_with_warmup".')  # fmt: skip
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--skip_nonfinite_steps", type=int, default=0,
                       help="Optimizer steps with a non-finite loss or gradient to skip before stopping (default: "
                            "stop at the first).")  # fmt: skip
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Default: accelerate's config.")  # fmt: skip
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (CUDA only); torch SDPA is the default.")  # fmt: skip

    group = parser.add_argument_group("checkpoints, logging, hub")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    group.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    group.add_argument("--logging_dir", default="logs", help="Tracker folder inside --output_dir.")
    group.add_argument("--tracker_name", default="inpo")
    group.add_argument("--run_validation", action="store_true", help="Generate validation images.")
    group.add_argument("--validation_steps", type=int, default=200)
    group.add_argument("--validation_prompts", nargs="+", default=DEFAULT_VALIDATION_PROMPTS)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--hub_token", default=None)
    return parser


def validate_training_args(args):
    """Refuse impossible settings before anything is loaded, saying how to fix them."""
    problems = []
    if args.resolution % 8:
        problems.append(f"--resolution {args.resolution} is not a multiple of 8 (the VAE downsamples by 8).")
    if args.train_mode == "lora" and args.rank < 1:
        problems.append(f"--rank must be at least 1, got {args.rank}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.beta_dpo <= 0:
        problems.append(f"--beta_dpo must be positive, got {args.beta_dpo}.")
    if not 1 <= args.inversion_steps <= 1000:
        problems.append(f"--inversion_steps must be in [1, 1000], got {args.inversion_steps}.")
    if args.inversion_eta is not None and args.inversion_eta < 0:
        problems.append(f"--inversion_eta must be >= 0, got {args.inversion_eta}.")
    if not 0 <= args.fresh_noise_mix <= 1:
        problems.append(f"--fresh_noise_mix must be in [0, 1], got {args.fresh_noise_mix}.")
    if args.fresh_noise_mix > 0 and args.latent_source != "inverted_noise":
        problems.append("--fresh_noise_mix mixes into the inverted noise; it needs --latent_source inverted_noise.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        problems.append("--proportion_empty_prompts must be in [0, 1].")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        problems.append("--train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        problems.append("--hub_token with --report_to wandb would leak the token into the run config; "
                        "log in with `huggingface-cli login` instead.")  # fmt: skip
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        candidate = os.path.join(args.output_dir, os.path.basename(args.resume_from_checkpoint))
        if not os.path.isdir(candidate):
            problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist (nor "
                            f"{candidate!r}); pass a checkpoint-<step> folder or 'latest'.")  # fmt: skip
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            problems.append("--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
                            "(CUDA only), or drop the flag to use torch SDPA.")  # fmt: skip
    if args.precompute_inversion_cache and args.inversion_cache_dir is None:
        problems.append("--precompute_inversion_cache needs --inversion_cache_dir (where to write the cache).")
    if args.inversion_cache_dir is not None:
        if args.latent_source == "forward":
            problems.append("--inversion_cache_dir holds inverted latents; it cannot train --latent_source forward.")
        if args.fresh_noise_mix > 0:
            problems.append("--fresh_noise_mix draws new noise every step, so the reference errors cannot be cached; "
                            "train online (without --inversion_cache_dir).")  # fmt: skip
        if args.inversion_model == "policy":
            problems.append("The inversion cache is made by the frozen reference; drop --inversion_model policy "
                            "(or train online without --inversion_cache_dir).")  # fmt: skip
    if args.cache_shard_size < 1:
        problems.append("--cache_shard_size must be at least 1.")
    if args.streaming:
        if args.max_train_steps is None:
            problems.append("--streaming needs --max_train_steps: a stream's length is unknown until it is read.")
        if args.max_train_samples is not None:
            problems.append("--max_train_samples does not apply to --streaming; bound the run with "
                            "--max_train_steps.")  # fmt: skip
        if args.dataloader_num_workers > 0:
            problems.append("--streaming reads in the training process (workers would split the stream by file and "
                            "lose the resume position); drop --dataloader_num_workers.")  # fmt: skip
        if args.inversion_cache_dir is not None:
            problems.append("--streaming does not combine with the inversion cache: precompute from a downloaded "
                            "dataset, then train from the cache (it is already local).")  # fmt: skip
        if args.shuffle_buffer_size < 1:
            problems.append("--shuffle_buffer_size must be at least 1.")
    if problems:
        raise ValueError("Invalid arguments:\n  " + "\n  ".join(problems))
    # Defaults that depend on the latent source: inverted noise is one fixed noise per image from the frozen
    # reference (what the benchmark measured, and what a cache stores); the paper's inversion is online by the policy.
    fixed_noise = args.latent_source == "inverted_noise" or args.inversion_cache_dir is not None
    if args.inversion_model is None:
        args.inversion_model = "reference" if fixed_noise else "policy"
    if args.inversion_eta is None:
        args.inversion_eta = 0.0 if args.latent_source == "inverted_noise" else 0.1


def check_sharding(args, accelerator):
    """Refuse what FSDP cannot run, before any weights load. (DeepSpeed ZeRO-2 shards only optimizer states and
    gradients, so every process still holds whole weights and everything else works as under DDP.)"""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    problems = []
    if args.train_mode == "lora":
        problems.append("FSDP is for --train_mode full. LoRA adapters are small, and their reference is the same "
                        "UNet with the adapters off, which FSDP's shards cannot be called as: use DDP "
                        "(accelerate_configs/ddp_8gpu.yaml) or DeepSpeed ZeRO-2.")  # fmt: skip
    elif args.latent_source == "inversion" and args.inversion_model == "policy" and args.inversion_cache_dir is None:
        problems.append("Under FSDP every process must make the same UNet calls, but inverting with the policy "
                        "calls it once per grid point below each pair's t, which differs between processes. Pass "
                        "--inversion_model reference (the frozen copy, outside FSDP), or use DeepSpeed ZeRO-2.")  # fmt: skip
    if problems:
        raise ValueError("Not supported under FSDP:\n  " + "\n  ".join(problems))


def check_local_pipeline(args, is_sdxl):
    """For a local model folder, name the subfolders it lacks before anything is loaded (hub ids are left to
    diffusers). Training from the inversion cache needs only the UNet (and the rest for validation images)."""
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path):
        return
    needed = ["unet", "scheduler"]
    if args.inversion_cache_dir is None or args.precompute_inversion_cache or args.run_validation:
        needed += ["tokenizer", "text_encoder"] + (["tokenizer_2", "text_encoder_2"] if is_sdxl else [])
        if not (is_sdxl and args.pretrained_vae_model_name_or_path):
            needed.append("vae")
    missing = [name for name in needed if not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise ValueError(f"{path!r} lacks the subfolder(s) {missing}: point --pretrained_model_name_or_path at a "
                         "complete diffusers pipeline folder (as written by `pipeline.save_pretrained`).")  # fmt: skip


def check_model_family(pretrained_model_name_or_path, revision, cache_dir, want_sdxl):
    """Read the UNet and scheduler configs (no weights) and refuse the wrong family or a prediction type we
    can't train. Returns the scheduler config."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    try:
        unet_config = UNet2DConditionModel.load_config(pretrained_model_name_or_path, subfolder="unet",
                                                       revision=revision, cache_dir=cache_dir)  # fmt: skip
        scheduler_config = DDIMScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler",
                                                     revision=revision, cache_dir=cache_dir)  # fmt: skip
    except OSError as error:
        raise ValueError(f"{pretrained_model_name_or_path!r} is not a diffusers pipeline with unet/ and scheduler/ "
                         f"subfolders: {error}") from error  # fmt: skip
    is_sdxl = unet_config.get("addition_embed_type") == "text_time"
    if is_sdxl and not want_sdxl:
        raise ValueError(f"{pretrained_model_name_or_path!r} is an SDXL checkpoint (its UNet takes text_time "
                         "conditioning): use train_inpo_sdxl.py.")  # fmt: skip
    if want_sdxl and not is_sdxl:
        raise ValueError(f"{pretrained_model_name_or_path!r} is not an SDXL checkpoint (its UNet has no text_time "
                         "conditioning): use train_inpo.py for SD 1.x/2.x.")  # fmt: skip
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(f"The scheduler of {pretrained_model_name_or_path!r} predicts {prediction_type!r}; InPO "
                         f"supports {SUPPORTED_PREDICTION_TYPES}.")  # fmt: skip
    return DDIMScheduler.from_config(scheduler_config).config


# --------------------------------------------------------------------------------------------------------------
# Training run: accelerator, policy/reference, optimizer, checkpoints, loop, saving
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # Epoch shuffles from (seed, epoch), so a resumed run reads pairs in the uninterrupted order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )  # fmt: skip
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        # Same on every process: LoRA initialisation and anything else drawn before the per-process generator.
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_of(accelerator):
    """dtype for frozen weights: fp16/bf16 under mixed precision; trainable parameters stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


class StepRandomness:
    """The generator behind timesteps, VAE sampling and inversion noise: one stream per process (seed + rank),
    saved in checkpoints so a resumed run draws the same numbers as an uninterrupted one (the global RNGs are also
    touched by data loading, so they can't serve)."""

    def __init__(self, seed, accelerator):
        self.accelerator = accelerator
        self.generator = torch.Generator(device=accelerator.device)
        self.generator.manual_seed(seed + accelerator.process_index)

    def state_dict(self):
        # Called on every process by save_state; only the main process writes, so it must hold all streams.
        state = self.generator.get_state().to(self.accelerator.device)
        return {"states": self.accelerator.gather(state[None]).cpu()}

    def load_state_dict(self, state):
        states = state["states"]
        if self.accelerator.process_index < len(states):  # a process the checkpoint lacks keeps its fresh seed
            # clone: set_state on a row view (non-zero storage offset) crashes torch 2.13 with a segfault
            self.generator.set_state(states[self.accelerator.process_index].clone().to(self.generator.get_state().device))


def setup_policy_and_reference(unet, args, accelerator, with_reference=True):
    """Make `unet` the trainable policy and return (unet, reference, trainable_params).

    LoRA: base weights frozen in the mixed-precision dtype, adapters in fp32; the reference is the same UNet with
    the adapters disabled. Full: the whole UNet trains in fp32 against a frozen copy in the mixed-precision dtype
    (not made when `with_reference` is False: training from the cache needs none).
    """
    import copy

    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    weight_dtype = weight_dtype_of(accelerator)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.train_mode == "lora":
        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha or args.rank,
            init_lora_weights="gaussian",
            target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
        ))  # fmt: skip
        cast_training_params(unet, dtype=torch.float32)
        reference = AdaptersDisabled(unet)
    else:
        reference = None
        if with_reference:
            reference = copy.deepcopy(unet).requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
        unet.requires_grad_(True)
        unet.to(accelerator.device, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"No UNet module matched --lora_target_modules {args.lora_target_modules!r}.")
    return unet, reference, trainable


def make_optimizer(params, args):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)  # fmt: skip


def lora_layers(unet):
    """The UNet's LoRA weights in diffusers' format (what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def register_checkpoint_hooks(accelerator, args, pipeline_cls):
    """Make `save_state` write the LoRA in diffusers' format (or the full UNet) instead of a pickled state dict,
    and `load_state` read it back, keeping trainable parameters in fp32."""
    from accelerate.utils import DistributedType
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if accelerator.distributed_type == DistributedType.FSDP:
        return  # accelerate saves and restores FSDP's shards itself; the unwrapped module holds only one shard

    def save_hook(models, weights, output_dir):
        for model in models:
            model = accelerator.unwrap_model(model)
            if accelerator.is_main_process and args.train_mode == "lora":
                pipeline_cls.save_lora_weights(output_dir, unet_lora_layers=lora_layers(model))
            elif accelerator.is_main_process:
                model.save_pretrained(os.path.join(output_dir, "unet"))
            if weights:  # saved above in diffusers' format; keep accelerate from pickling it again
                weights.pop()

    def load_hook(models, input_dir):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            return  # the engine restores its weights (and fp32 master copies) from its own checkpoint
        while models:
            model = accelerator.unwrap_model(models.pop())
            if args.train_mode == "lora":
                state_dict, _ = pipeline_cls.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
                unet_state = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
                incompatible = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(unet_state),
                                                         adapter_name="default")  # fmt: skip
                if incompatible is not None and incompatible.unexpected_keys:
                    raise ValueError(f"Checkpoint {input_dir} has LoRA weights this model lacks: "
                                     f"{incompatible.unexpected_keys[:3]} (different --rank/--lora_target_modules?)")
                cast_training_params(model, dtype=torch.float32)
            else:
                saved = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(saved.state_dict())
                del saved

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


RUN_SETTINGS_FILE = "inpo_run.json"
# Settings a checkpoint cannot be resumed across: they change what the saved weights are.
STRUCTURAL_SETTINGS = ("pretrained_model_name_or_path", "revision", "variant", "train_mode", "rank", "lora_alpha",
                       "lora_target_modules", "dataset_name", "dataset_split_name", "max_train_samples", "resolution")  # fmt: skip


def run_settings(args, is_sdxl):
    settings = {name: getattr(args, name) for name in STRUCTURAL_SETTINGS}
    settings["family"] = "sdxl" if is_sdxl else "sd"
    return settings


def check_output_dir(args, is_sdxl):
    """Refuse an --output_dir that holds checkpoints of a different run, or of an earlier run when not resuming,
    instead of mixing their checkpoints with this run's."""
    checkpoints = list_checkpoints(args.output_dir)
    if not checkpoints:
        return
    settings_path = os.path.join(args.output_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            differences = fingerprint_differences(json.load(f), run_settings(args, is_sdxl))
        if differences:
            raise ValueError(f"--output_dir {args.output_dir!r} holds checkpoints of a run with other settings; use a "
                             "new --output_dir:\n  " + "\n  ".join(d.replace("cache has", "that run has") for d in differences))  # fmt: skip
    if args.resume_from_checkpoint is None:
        raise ValueError(f"--output_dir {args.output_dir!r} already holds {checkpoints[-1]} from an earlier run: pass "
                         "--resume_from_checkpoint latest to continue it, or choose another --output_dir.")  # fmt: skip


def write_run_settings(args, is_sdxl):
    with open(os.path.join(args.output_dir, RUN_SETTINGS_FILE), "w") as f:
        json.dump(run_settings(args, is_sdxl), f, indent=1)


def list_checkpoints(output_dir):
    """checkpoint-<step> folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(names, key=lambda name: int(name[len(CHECKPOINT_PREFIX):]))


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """Path of the checkpoint to resume from, or None for "latest" with nothing saved yet."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return os.path.join(output_dir, checkpoints[-1]) if checkpoints else None
    if os.path.isdir(resume_from_checkpoint):
        return resume_from_checkpoint
    return os.path.join(output_dir, os.path.basename(resume_from_checkpoint))


def prune_checkpoints(output_dir, total_limit, about_to_save=1):
    """Delete the oldest checkpoints so that at most `total_limit` remain after saving `about_to_save` more."""
    import shutil

    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) + about_to_save - total_limit
    removed = checkpoints[: max(excess, 0)]
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name))
    return removed


def save_checkpoint(accelerator, args, global_step):
    """`accelerator.save_state` into a temporary folder, then an atomic rename: a run killed mid-save never
    leaves a half-written checkpoint for `latest` to pick."""
    import shutil

    final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    partial = os.path.join(args.output_dir, f".partial-{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process:
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def gather_mean(accelerator, metrics):
    """Average a dict of scalar tensors over processes; returns floats."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[name].detach().float() for name in names])
    gathered = accelerator.gather(stacked[None]).mean(dim=0)
    return {name: value.item() for name, value in zip(names, gathered)}


def main_process_logger():
    """A logger that writes on the main process only (accelerate's), for messages every process would repeat."""
    from accelerate.logging import get_logger

    return get_logger(__name__)


def all_finite(accelerator, value):
    """True when `value` is finite on every process."""
    flag = torch.isfinite(value).all().float().reshape(1)
    return bool(accelerator.gather(flag).min() > 0)


def train_loop(accelerator, args, unet, optimizer, lr_scheduler, dataloader, pairs, step_loss, on_validation,
               params_to_clip):  # fmt: skip
    """The optimisation loop both scripts run: resume, accumulate, clip, log, checkpoint, validate.

    `step_loss(batch) -> (loss, metrics)` is the script's step; `on_validation(global_step)` makes images.
    Returns the final global step.
    """
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm

    logger = main_process_logger()
    # A stream runs its own epochs without end and restores its position from the checkpoint itself.
    streaming = isinstance(pairs, torch.utils.data.IterableDataset)
    updates_per_epoch = math.inf if streaming else math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = 1 if streaming else math.ceil(args.max_train_steps / updates_per_epoch)
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None and args.resume_from_checkpoint:
        accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")
    elif checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
        global_step = int(os.path.basename(checkpoint)[len(CHECKPOINT_PREFIX):])
        if not streaming:
            first_epoch = global_step // updates_per_epoch
            batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    num_pairs = "streamed" if streaming else len(pairs)
    logger.info(f"***** InPO training *****  pairs = {num_pairs}, epochs = {num_epochs}, pairs per device "
                f"per micro-batch = {args.train_batch_size}, total pairs per step (processes x accumulation) = "
                f"{total_batch}, optimizer steps = {args.max_train_steps}, starting at step {global_step}")  # fmt: skip
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    accumulated = {}
    step_started = time.perf_counter()
    window_is_finite, nonfinite_steps = True, 0
    for epoch in range(first_epoch, num_epochs):
        unet.train()
        if streaming:  # not prepared by accelerate: each process already reads its own share
            epoch_loader = (send_to_device(batch, accelerator.device) for batch in dataloader)
        else:
            pairs.set_epoch(epoch)
            dataloader.set_epoch(epoch)
            epoch_loader = dataloader
        if epoch == first_epoch and batches_to_skip:
            epoch_loader = accelerator.skip_first_batches(dataloader, batches_to_skip)
        for batch in epoch_loader:
            if batch is None:
                continue
            with accelerator.accumulate(unet):
                loss, metrics = step_loss(batch)
                # Decided on the values of every process, so all of them skip or step together.
                if all_finite(accelerator, loss.detach()):
                    accelerator.backward(loss)
                else:
                    window_is_finite = False
                if accelerator.sync_gradients and window_is_finite and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
                    window_is_finite = all_finite(accelerator, torch.as_tensor(grad_norm, device=accelerator.device))
                if accelerator.sync_gradients and window_is_finite:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in gather_mean(accelerator, metrics).items():
                accumulated[name] = accumulated.get(name, 0.0) + value / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            if not window_is_finite:
                nonfinite_steps += 1
                if nonfinite_steps > args.skip_nonfinite_steps:
                    last = list_checkpoints(args.output_dir)
                    raise FloatingPointError(
                        f"Non-finite loss or gradient at optimizer step {global_step + 1} (mean timestep "
                        f"{accumulated.get('timestep', float('nan')):.0f}; metrics "
                        f"{ {k: round(v, 6) for k, v in accumulated.items()} }). Stopped without saving; the last "
                        f"good checkpoint is {last[-1] if last else 'none'}. Lower --learning_rate or --beta_dpo, "
                        "prefer bf16 to fp16, or pass --skip_nonfinite_steps N to skip up to N such steps."
                    )  # fmt: skip
                logger.warning(f"Skipped optimizer step {global_step + 1}: non-finite loss or gradient "
                               f"({nonfinite_steps}/{args.skip_nonfinite_steps} allowed).")  # fmt: skip
            window_is_finite = True
            global_step += 1
            accumulated["skipped_nonfinite_steps"] = nonfinite_steps
            progress.update(1)
            accumulated["lr"] = lr_scheduler.get_last_lr()[0]
            # Seconds per optimizer step, excluding checkpointing and validation (logged for benchmarks/).
            accumulated["step_time"] = time.perf_counter() - step_started
            step_started = time.perf_counter()
            progress.set_postfix(loss=f"{accumulated['loss']:.4f}", acc=f"{accumulated['implicit_acc']:.2f}")
            accelerator.log(accumulated, step=global_step)
            accumulated = {}
            if global_step % args.checkpointing_steps == 0:
                logger.info(f"Saved {save_checkpoint(accelerator, args, global_step)}")
            if args.run_validation and global_step % args.validation_steps == 0:
                on_validation(global_step)
            step_started = time.perf_counter()
            if global_step >= args.max_train_steps:
                break
    return global_step


def resolve_max_train_steps(args, num_batches_per_epoch):
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    return args.max_train_steps


def make_lr_scheduler(optimizer, args, num_processes):
    from diffusers.optimization import get_scheduler

    # The prepared scheduler steps once per process per optimizer step.
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)  # fmt: skip


def log_validation_images(accelerator, pipeline, prompts, seed, resolution, step, tag="validation"):
    """Generate one image per prompt with a fixed seed, log them to the trackers, return them (PIL)."""
    pipeline.set_progress_bar_config(disable=True)
    # Prompt i gets seed + i, as in evaluate_inpo.py, so an image does not depend on the prompts before it.
    # Autocast: mid-run the UNet mixes fp32 LoRA weights with half-precision base weights and the VAE is half.
    with accelerator.autocast():
        images = [pipeline(prompt, num_inference_steps=25, height=resolution, width=resolution,
                           generator=torch.Generator(device=accelerator.device).manual_seed((seed or 0) + i)).images[0]
                  for i, prompt in enumerate(prompts)]  # fmt: skip
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=p) for image, p in zip(images, prompts)]}, step=step)
    return images


def write_model_card(args, output_dir, images=None, is_sdxl=False):
    """README.md for the output folder: base model, data, InPO settings; the validation grid if there is one."""
    from diffusers.utils import make_image_grid
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    if images:
        make_image_grid(images, 1, len(images)).save(os.path.join(output_dir, "validation_grid.png"))
    kind = "LoRA adapters" if args.train_mode == "lora" else "a fully fine-tuned UNet"
    description = f"""
# InPO {'SDXL ' if is_sdxl else ''}{kind} for {args.pretrained_model_name_or_path}

Aligned with DDIM-InPO (Inversion Preference Optimization, CVPR 2025) on `{args.dataset_name}`
(split `{args.dataset_split_name}`{f', {args.max_train_samples} pairs' if args.max_train_samples else ''}).

| setting | value |
|---|---|
| β (beta_dpo) | {args.beta_dpo} |
| optimizer steps | {args.max_train_steps} |
| pairs per step | {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x processes |
| learning rate | {args.learning_rate} ({args.lr_scheduler}) |
| latent source | {args.latent_source} (inversion: {args.inversion_steps} steps, eta {args.inversion_eta}, endpoint {args.inversion_endpoint}, by the {args.inversion_model}{f'; x0 projection {args.noise_x0_projection}, fresh noise mix {args.fresh_noise_mix}' if args.latent_source == 'inverted_noise' else ''}) |
| train mode | {args.train_mode}{f', rank {args.rank}' if args.train_mode == 'lora' else ''} |
| resolution | {args.resolution} |

{'![validation](validation_grid.png)' if images else ''}

Load it with `pipe.load_lora_weights("{args.hub_model_id or output_dir}")` on the base pipeline.
"""
    # Built locally rather than through `load_or_create_model_card`, which looks the output folder up on the hub.
    card = ModelCard.from_template(
        ModelCardData(license="openrail++", library_name="diffusers", base_model=args.pretrained_model_name_or_path),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    tags = ["text-to-image", "diffusers", "inpo", "diffusion-dpo", "stable-diffusion-xl" if is_sdxl else "stable-diffusion"]
    if args.train_mode == "lora":
        tags.append("lora")
    populate_model_card(card, tags=tags).save(os.path.join(output_dir, "README.md"))


def push_output_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True,
                          token=args.hub_token).repo_id  # fmt: skip
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="InPO training results",
                  ignore_patterns=[f"{CHECKPOINT_PREFIX}*", ".partial-*"], token=args.hub_token)  # fmt: skip


class InpoStep:
    """One micro-batch of B pairs → (loss, metrics). Subclasses say how captions become UNet conditioning."""

    def __init__(self, args, accelerator, unet, reference, vae, inverse_scheduler, generator):
        self.args = args
        self.accelerator = accelerator
        self.unet = unet
        self.reference = reference
        self.vae = vae
        self.inverse_scheduler = inverse_scheduler
        self.generator = generator

    def encode_conditioning(self, batch):
        """→ (encoder_hidden_states (2B, L, D), added_cond_kwargs dict of (2B, ...) tensors or None)."""
        raise NotImplementedError

    def drop_captions(self, captions):
        """Replace a --proportion_empty_prompts share of captions by '' (unconditional training signal)."""
        drop = torch.rand(len(captions), generator=self.generator, device=self.generator.device)
        return ["" if dropped else caption for caption, dropped in zip(captions, drop < self.args.proportion_empty_prompts)]

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """(2B, 3, R, R) in [−1, 1] → (2B, 4, R/8, R/8) scaled latents, in chunks to bound VAE memory."""
        chunks = pixel_values.to(self.vae.device, self.vae.dtype).split(self.args.vae_encode_batch_size)
        latents = [self.vae.encode(chunk).latent_dist.sample(generator=self.generator) for chunk in chunks]
        return torch.cat(latents).float() * self.vae.config.scaling_factor

    def __call__(self, batch):
        x0 = self.encode_images(batch["pixel_values"])
        encoder_hidden_states, added_cond_kwargs = self.encode_conditioning(batch)
        policy = self.accelerator.unwrap_model(self.unet)
        inversion_unet = policy if self.args.inversion_model == "policy" else self.reference
        with self.accelerator.autocast():
            return inpo_step_loss(
                self.unet, self.reference, inversion_unet, x0, encoder_hidden_states, self.inverse_scheduler,
                self.args.beta_dpo, latent_source=self.args.latent_source, eta=self.args.inversion_eta,
                endpoint=self.args.inversion_endpoint, added_cond_kwargs=added_cond_kwargs, generator=self.generator,
                x0_projection=self.args.noise_x0_projection, fresh_noise_mix=self.args.fresh_noise_mix,
            )  # fmt: skip


def make_dataloader(pairs, collate_fn, args):
    """Shuffled batches of pairs; `accelerator.prepare` then gives each process its own share of every epoch.
    A stream (StreamingPairs) shuffles and splits itself."""
    streaming = isinstance(pairs, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(pairs, batch_size=args.train_batch_size, shuffle=not streaming,
                                       collate_fn=collate_fn, num_workers=args.dataloader_num_workers)  # fmt: skip


def check_replicas_in_sync(accelerator, params):
    """Raise if the trained weights differ between processes (a broken data-parallel set-up); log when they agree."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=0):
        raise RuntimeError(f"Trained weights differ between processes (checksums {sums.tolist()}).")
    main_process_logger().info(f"Trained weights identical on all {accelerator.num_processes} processes "
                               f"(checksum {sums[0].item():.9g}).")  # fmt: skip


def run_training(args, accelerator, family, scheduler_config, pairs, collate_fn, unet, make_step, make_pipeline):
    """Everything after the models are loaded: LoRA/reference set-up, data loader, optimizer, the loop, and the
    final save (diffusers-format LoRA or a full pipeline), validation and model card.

    pairs: a dataset with `set_epoch` (PreferencePairs or CachedPairs) batched by `collate_fn`.
    make_step(unet, reference, inverse_scheduler, generator) -> a callable batch -> (loss, metrics).
    make_pipeline(**components) -> the family's pipeline on the base model with `components` swapped in.
    """
    from accelerate.utils import DistributedType
    from diffusers import UNet2DConditionModel
    from diffusers.utils.torch_utils import is_compiled_module

    seed = 0 if args.seed is None else args.seed
    with_reference = args.inversion_cache_dir is None  # the cache already holds the reference's errors
    unet, reference, trainable = setup_policy_and_reference(unet, args, accelerator, with_reference)
    inverse_scheduler = make_inverse_scheduler(scheduler_config, args.inversion_steps)
    register_checkpoint_hooks(accelerator, args, family.pipeline_cls)
    randomness = StepRandomness(seed, accelerator)
    accelerator.register_for_checkpointing(randomness)
    streaming = isinstance(pairs, StreamingPairs)
    if streaming:
        accelerator.register_for_checkpointing(pairs)
    dataloader = make_dataloader(pairs, collate_fn, args)
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(trainable, args)
    if not streaming:  # --streaming requires --max_train_steps
        resolve_max_train_steps(args, len(dataloader) / accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    if streaming:  # each process already reads its own share; DeepSpeed learns the batch size from the config
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        write_run_settings(args, family.is_sdxl)
        config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)}
        accelerator.init_trackers(args.tracker_name, config)

    def unwrapped_policy():
        policy = accelerator.unwrap_model(unet)
        return policy._orig_mod if is_compiled_module(policy) else policy

    def exportable_policy():
        """The policy with whole weights on the main process (None elsewhere). Call on every process: under FSDP
        it gathers the shards into a fresh UNet."""
        if accelerator.distributed_type != DistributedType.FSDP:
            return unwrapped_policy() if accelerator.is_main_process else None
        weights = accelerator.get_state_dict(unet)
        if not accelerator.is_main_process:
            return None
        policy = UNet2DConditionModel.from_config(unwrapped_policy().config)
        policy.load_state_dict(weights)
        return policy.to(accelerator.device)

    def validate(global_step):
        policy = exportable_policy()
        if accelerator.is_main_process:
            log_validation_images(accelerator, make_pipeline(unet=policy), args.validation_prompts, args.seed,
                                  args.resolution, global_step)  # fmt: skip
            unet.train()

    step = make_step(unet, reference, inverse_scheduler, randomness.generator)
    train_loop(accelerator, args, unet, optimizer, lr_scheduler, dataloader, pairs, step, validate, trainable)
    if accelerator.distributed_type != DistributedType.FSDP:  # FSDP's processes hold different shards by design
        check_replicas_in_sync(accelerator, trainable)

    accelerator.wait_for_everyone()
    policy = exportable_policy()
    if accelerator.is_main_process:
        if args.train_mode == "lora":
            family.pipeline_cls.save_lora_weights(args.output_dir, unet_lora_layers=lora_layers(policy))
            # Validate what users will load: the saved file on a fresh base pipeline.
            final_pipeline = make_pipeline() if args.run_validation else None
            if final_pipeline is not None:
                final_pipeline.load_lora_weights(args.output_dir)
        else:
            final_pipeline = make_pipeline(unet=policy.to(weight_dtype_of(accelerator)))
            final_pipeline.save_pretrained(args.output_dir)
        images = None
        if args.run_validation:
            images = log_validation_images(accelerator, final_pipeline, args.validation_prompts, args.seed,
                                           args.resolution, args.max_train_steps, tag="final")  # fmt: skip
        write_model_card(args, args.output_dir, images, is_sdxl=family.is_sdxl)
        if args.push_to_hub:
            push_output_to_hub(args)
    accelerator.end_training()


# --------------------------------------------------------------------------------------------------------------
# Invert once: a precomputed inversion + reference cache (README "Invert once")
# --------------------------------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CACHE_FINGERPRINT_FILE = "fingerprint.json"
CACHE_MANIFEST_FILE = "manifest.json"


def cache_fingerprint(args, scheduler_config, is_sdxl):
    """Everything a cache's contents depend on. Training refuses a cache whose fingerprint differs."""
    fingerprint = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
        "scheduler": {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")},
        "dataset": args.dataset_name, "split": args.dataset_split_name, "max_train_samples": args.max_train_samples,
        "seed": args.seed, "resolution": args.resolution, "random_crop": args.random_crop, "hflip": not args.no_hflip,
        "proportion_empty_prompts": args.proportion_empty_prompts,
        "inversion_steps": args.inversion_steps, "inversion_eta": args.inversion_eta,
        "inversion_endpoint": args.inversion_endpoint, "cache_timesteps": args.cache_timesteps,
        "cache_dtype": args.cache_dtype, "latent_source": args.latent_source,
        "noise_x0_projection": args.noise_x0_projection,
    }  # fmt: skip
    if is_sdxl:
        fingerprint.update(vae=args.pretrained_vae_model_name_or_path, fixed_time_ids=args.fixed_time_ids)
    return json.loads(json.dumps(fingerprint))  # normalise tuples/floats as they will read back


def fingerprint_differences(stored, current):
    """Human-readable list of the settings that differ between two fingerprints."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: cache has {stored.get(k)!r}, this run has {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def read_cache_manifest(cache_dir, fingerprint):
    """The manifest of a complete cache made with `fingerprint`; a clear error for a missing, partial or stale one."""
    manifest_path = os.path.join(cache_dir, CACHE_MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        state = "is incomplete (no manifest.json: the precompute did not finish)" if os.path.isdir(cache_dir) else "does not exist"
        raise ValueError(f"Inversion cache {cache_dir!r} {state}. Run the same command with "
                         "--precompute_inversion_cache first; it resumes where it stopped.")  # fmt: skip
    with open(manifest_path) as f:
        manifest = json.load(f)
    differences = fingerprint_differences(manifest["fingerprint"], fingerprint)
    if differences:
        raise ValueError(f"Inversion cache {cache_dir!r} was made with other settings; precompute a new cache or "
                         "train with the cache's settings:\n  " + "\n  ".join(differences))  # fmt: skip
    return manifest


def shard_file(cache_dir, index):
    return os.path.join(cache_dir, f"shard-{index:05d}.safetensors")


def grid_inversion_inputs(x0, trajectory, endpoint):
    """The inverted latent the loss sees for each grid timestep, given the trajectory of a full inversion.

    t = grid point k: `exact` lands on it (trajectory[k]); `grid` stops at the point below (trajectory[k−1], or x0
    for k = 0). Args: x0 (N, C, H, W), trajectory (K, N, C, H, W). Returns (K, N, C, H, W).
    """
    if endpoint == "exact":
        return trajectory
    return torch.cat([x0[None].float(), trajectory[:-1]])


def precompute_inversion_cache(args, accelerator, dataset, step, fingerprint, log=print):
    """Write the cache shard by shard: x0, text conditioning, inverted latents (with --latent_source
    inverted_noise: each image's inverted noise instead) and reference errors.

    `step` is the script's InpoStep built on the frozen reference (its encoders give x0 and the conditioning).
    Shard i holds pairs [i·S, (i+1)·S) and is written by process i mod N, to a temporary file then renamed, so an
    interrupted precompute resumes with the shards that are missing. The manifest is written last.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cache_dir = args.inversion_cache_dir
    if accelerator.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)
        fingerprint_path = os.path.join(cache_dir, CACHE_FINGERPRINT_FILE)
        if os.path.isfile(fingerprint_path):
            with open(fingerprint_path) as f:
                differences = fingerprint_differences(json.load(f), fingerprint)
            if differences:
                raise ValueError(f"{cache_dir!r} holds a cache made with other settings; use another "
                                 "--inversion_cache_dir or delete it:\n  " + "\n  ".join(differences))  # fmt: skip
        with open(fingerprint_path, "w") as f:
            json.dump(fingerprint, f, indent=1)
    accelerator.wait_for_everyone()

    store_dtype = CACHE_DTYPES[args.cache_dtype]
    inverse_scheduler = step.inverse_scheduler
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(accelerator.device)
    grid = inverse_scheduler.timesteps.to(accelerator.device)
    seed = 0 if args.seed is None else args.seed
    pairs = PreferencePairs(dataset, args.resolution, args.random_crop, not args.no_hflip, seed)
    num_shards = math.ceil(len(pairs) / args.cache_shard_size)
    my_shards = list(range(accelerator.process_index, num_shards, accelerator.num_processes))
    todo = [i for i in my_shards if not os.path.isfile(shard_file(cache_dir, i))]
    log(f"Inversion cache {cache_dir}: {num_shards} shards, {len(my_shards) - len(todo)} of this process's "
        f"{len(my_shards)} already written.")  # fmt: skip
    progress = tqdm(total=sum(min(args.cache_shard_size, len(pairs) - i * args.cache_shard_size) for i in todo),
                    desc="Inverting pairs", unit="pair", disable=not accelerator.is_local_main_process)  # fmt: skip
    written_bytes = 0
    started = time.perf_counter()
    for shard in todo:
        # A generator per shard: its contents do not depend on which process or run writes it.
        step.generator = torch.Generator(device=accelerator.device).manual_seed(seed * 100003 + shard)
        indices = range(shard * args.cache_shard_size, min((shard + 1) * args.cache_shard_size, len(pairs)))
        columns = {}
        for start in range(0, len(indices), args.train_batch_size):
            examples = [(i, pairs[i]) for i in indices[start : start + args.train_batch_size]]
            kept = [(i, example) for i, example in examples if example is not None]
            progress.update(len(examples))
            if not kept:
                continue
            rows = _cache_rows(args, step, collate_pairs([example for _, example in kept]), grid, alphas_cumprod,
                               accelerator)  # fmt: skip
            rows["pair_index"] = torch.tensor([i for i, _ in kept])
            for name, value in rows.items():
                columns.setdefault(name, []).append(value.cpu())
        tensors = {name: torch.cat(values).contiguous() for name, values in columns.items()}
        tensors = {name: value.to(store_dtype) if value.is_floating_point() and name != "reference_errors" else value
                   for name, value in tensors.items()}  # fmt: skip
        partial = shard_file(cache_dir, shard) + ".partial"
        save_file(tensors, partial)
        os.replace(partial, shard_file(cache_dir, shard))
        written_bytes += os.path.getsize(shard_file(cache_dir, shard))
        elapsed = progress.format_dict["elapsed"] or 1e-9
        progress.set_postfix(pairs_per_s=f"{progress.n / elapsed:.2f}", written=f"{written_bytes / 2**20:.1f}MiB")
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_cache_manifest(cache_dir, fingerprint, num_shards, grid.tolist(), time.perf_counter() - started, log)
    accelerator.wait_for_everyone()


def _cache_rows(args, step, batch, grid, alphas_cumprod, accelerator):
    """Cache entries for one batch of B pairs, in per-pair layout (B, 2, ...) with the winner at index 0."""
    def as_stored(tensor):  # e_ref must be computed on exactly what training will read back
        return tensor.to(CACHE_DTYPES[args.cache_dtype]).float()

    x0 = as_stored(step.encode_images(batch["pixel_values"]))
    encoder_hidden_states, added_cond_kwargs = step.encode_conditioning(batch)
    encoder_hidden_states = as_stored(encoder_hidden_states).to(encoder_hidden_states.dtype)
    added_cond_kwargs = {k: as_stored(v).to(v.dtype) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
    num_pairs = len(x0) // 2
    prediction_type = step.inverse_scheduler.config.prediction_type

    def errors_at(latents, timesteps):
        noise = implied_noise(latents, x0, timesteps, alphas_cumprod)
        target = regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type)
        return reference_errors_at(step.reference, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs)

    def per_pair(tensor):  # (2B, ...) winners first → (B, 2, ...)
        return torch.stack(tensor.chunk(2), dim=1)

    def noised_errors_at(noise, timesteps):
        latents = forward_noised(x0, noise, timesteps, alphas_cumprod)
        target = regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type)
        return reference_errors_at(step.reference, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs)

    with accelerator.autocast():
        if args.latent_source == "inverted_noise":  # one noise per image; x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise at any t
            noise = as_stored(inverted_noise(step.reference, x0, encoder_hidden_states, step.inverse_scheduler,
                                             args.noise_x0_projection, args.inversion_eta, added_cond_kwargs,
                                             step.generator))  # fmt: skip
            if args.cache_timesteps == "grid":
                errors = torch.stack([noised_errors_at(noise, grid[k].repeat(len(x0))) for k in range(len(grid))], dim=-1)
                rows = {"noise": per_pair(noise), "reference_errors": per_pair(errors)}
            else:
                timesteps = torch.randint(0, step.inverse_scheduler.config.num_train_timesteps, (num_pairs,),
                                          generator=step.generator, device=x0.device).repeat(2)  # fmt: skip
                rows = {"noise": per_pair(noise), "reference_errors": per_pair(noised_errors_at(noise, timesteps)),
                        "timesteps": timesteps[:num_pairs]}  # fmt: skip
        elif args.cache_timesteps == "grid":
            beyond_grid = torch.full((len(x0),), step.inverse_scheduler.config.num_train_timesteps, device=x0.device)
            _, trajectory = ddim_invert(step.reference, x0, beyond_grid, encoder_hidden_states, step.inverse_scheduler,
                                        eta=args.inversion_eta, generator=step.generator,
                                        added_cond_kwargs=added_cond_kwargs, return_trajectory=True)  # fmt: skip
            trajectory = as_stored(trajectory)
            inputs = grid_inversion_inputs(x0, trajectory, args.inversion_endpoint)
            errors = torch.stack([errors_at(inputs[k], grid[k].repeat(len(x0))) for k in range(len(grid))], dim=-1)
            rows = {"latents": per_pair(trajectory.transpose(0, 1)), "reference_errors": per_pair(errors)}
        else:
            timesteps = torch.randint(0, step.inverse_scheduler.config.num_train_timesteps, (num_pairs,),
                                      generator=step.generator, device=x0.device).repeat(2)  # fmt: skip
            latents = ddim_invert(step.reference, x0, timesteps, encoder_hidden_states, step.inverse_scheduler,
                                  eta=args.inversion_eta, endpoint=args.inversion_endpoint, generator=step.generator,
                                  added_cond_kwargs=added_cond_kwargs)  # fmt: skip
            latents = as_stored(latents)
            rows = {"latents": per_pair(latents), "reference_errors": per_pair(errors_at(latents, timesteps)),
                    "timesteps": timesteps[:num_pairs]}  # fmt: skip
    rows["x0"] = per_pair(x0)
    rows["encoder_hidden_states"] = encoder_hidden_states[:num_pairs]
    for name, value in (added_cond_kwargs or {}).items():
        rows[f"added_cond.{name}"] = per_pair(value)
    return rows


def _write_cache_manifest(cache_dir, fingerprint, num_shards, grid, seconds, log):
    from safetensors import safe_open

    missing = [i for i in range(num_shards) if not os.path.isfile(shard_file(cache_dir, i))]
    if missing:
        raise RuntimeError(f"Cache shards {missing[:5]} are missing after the precompute; run it again to finish.")
    num_pairs, total_bytes = 0, 0
    for i in range(num_shards):
        with safe_open(shard_file(cache_dir, i), framework="pt") as f:
            num_pairs += f.get_slice("x0").get_shape()[0]
        total_bytes += os.path.getsize(shard_file(cache_dir, i))
    manifest = {"fingerprint": fingerprint, "num_pairs": num_pairs, "num_shards": num_shards, "grid_timesteps": grid,
                "bytes": total_bytes, "bytes_per_pair": total_bytes / max(num_pairs, 1),
                "seconds_last_run": seconds}  # fmt: skip
    with open(os.path.join(cache_dir, CACHE_MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"Inversion cache complete: {num_pairs} pairs in {num_shards} shards, {total_bytes / 2**20:.1f} MiB "
        f"({manifest['bytes_per_pair'] / 1024:.1f} KiB per pair).")  # fmt: skip


class CachedPairs(torch.utils.data.Dataset):
    """Pairs read back from a cache. With grid timesteps each read draws one grid point k from a generator seeded
    by (seed, epoch, index), so resumed runs see the same timesteps as uninterrupted ones."""

    def __init__(self, cache_dir, manifest, endpoint, seed=0):
        from safetensors import safe_open

        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self.grid = torch.tensor(manifest["grid_timesteps"])
        self.seed = seed or 0
        self.epoch = 0
        self.shards = [shard_file(cache_dir, i) for i in range(manifest["num_shards"])]
        self.index = []
        for shard, path in enumerate(self.shards):
            with safe_open(path, framework="pt") as f:
                self.index += [(shard, row) for row in range(f.get_slice("x0").get_shape()[0])]
                self.keys = list(f.keys())
        self.per_pair_timesteps = "timesteps" in self.keys
        self.handles = {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def _read(self, shard, name, row):
        from safetensors import safe_open

        if shard not in self.handles:  # opened lazily so each DataLoader worker gets its own handles
            self.handles[shard] = safe_open(self.shards[shard], framework="pt")
        return self.handles[shard].get_slice(name)[row]

    def __getitem__(self, index):
        shard, row = self.index[index]
        x0 = self._read(shard, "x0", row)
        # An inverted-noise cache holds one noise per image instead of latents; the step noises x0 with it.
        source = "noise" if "noise" in self.keys else "latents"
        if self.per_pair_timesteps:
            timestep = self._read(shard, "timesteps", row)
            stored = self._read(shard, source, row)
            reference_errors = self._read(shard, "reference_errors", row)
        else:
            k = int(np.random.default_rng((self.seed, self.epoch, index)).integers(len(self.grid)))
            timestep = self.grid[k]
            stored = self._read(shard, source, row)
            if source == "latents":  # (2, K, C, H, W): the trajectory
                stored = grid_inversion_inputs(x0, stored.transpose(0, 1), self.endpoint)[k]
            reference_errors = self._read(shard, "reference_errors", row)[:, k]
        example = {"x0": x0, source: stored, "timestep": timestep, "reference_errors": reference_errors,
                   "encoder_hidden_states": self._read(shard, "encoder_hidden_states", row)}  # fmt: skip
        for key in self.keys:
            if key.startswith("added_cond."):
                example[key] = self._read(shard, key, row)
        return example


def collate_cached(examples):
    """Batch cached pairs as 2B rows, winners first (the layout of `collate_pairs`); "latents" or, from an
    inverted-noise cache, "noise"."""

    def winners_then_losers(key):
        stacked = torch.stack([example[key] for example in examples])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])

    hidden = torch.stack([example["encoder_hidden_states"] for example in examples])
    source = "noise" if "noise" in examples[0] else "latents"
    return {
        "x0": winners_then_losers("x0"),
        source: winners_then_losers(source),
        "reference_errors": winners_then_losers("reference_errors"),
        "timesteps": torch.stack([torch.as_tensor(example["timestep"]) for example in examples]),
        "encoder_hidden_states": torch.cat([hidden, hidden]),
        "added_cond_kwargs": {key[len("added_cond."):]: winners_then_losers(key) for key in examples[0]
                              if key.startswith("added_cond.")} or None,
    }  # fmt: skip


class CachedInpoStep:
    """A training step from the cache: one policy forward + backward on 2B latents, nothing else."""

    def __init__(self, args, accelerator, unet, alphas_cumprod, prediction_type):
        self.args = args
        self.accelerator = accelerator
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod.to(accelerator.device)
        self.prediction_type = prediction_type

    def __call__(self, batch):
        device = self.accelerator.device
        x0 = batch["x0"].to(device, torch.float32)
        timesteps = batch["timesteps"].to(device).long().repeat(2)
        if "noise" in batch:  # inverted-noise cache
            noise = batch["noise"].to(device, torch.float32)
            latents = forward_noised(x0, noise, timesteps, self.alphas_cumprod)
        else:
            latents = batch["latents"].to(device, torch.float32)
            noise = implied_noise(latents, x0, timesteps, self.alphas_cumprod)
        target = regression_target(noise, x0, timesteps, self.alphas_cumprod, self.prediction_type)
        weight_dtype = weight_dtype_of(self.accelerator)
        added = {k: v.to(device, weight_dtype) for k, v in (batch["added_cond_kwargs"] or {}).items()} or None
        with self.accelerator.autocast():
            return score_pairs(self.unet, latents, target, timesteps, batch["encoder_hidden_states"].to(device, weight_dtype),
                               batch["reference_errors"].to(device), self.args.beta_dpo, added)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The whole run, for either model family
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelFamily:
    """What differs between SD 1.x/2.x and SDXL; `run` does the rest.

    load_frozen_models(args, accelerator) -> dict of frozen pipeline components (tokenizers, text encoders, vae),
        keyed by their pipeline names.
    make_step(frozen, **InpoStep kwargs) -> the family's InpoStep.
    make_pipeline(args, accelerator, **components) -> the base pipeline with `components` swapped in.
    """

    is_sdxl: bool
    pipeline_cls: type
    load_frozen_models: Callable
    make_step: Callable
    make_pipeline: Callable


def weight_loading_kwargs(args):
    """from_pretrained kwargs for weights: safetensors only unless --allow_unsafe_pickle_weights."""
    return {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir,
            "use_safetensors": None if args.allow_unsafe_pickle_weights else True}  # fmt: skip


def load_unet(args):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                **weight_loading_kwargs(args))  # fmt: skip


def run(args, family):
    """Stages: checks → data (pairs or the cache) → models → precompute the cache, or train and save."""
    from accelerate.logging import get_logger

    logger = get_logger(__name__)
    accelerator = make_accelerator(args)
    logger.info(accelerator.state, main_process_only=False)
    check_sharding(args, accelerator)

    # Cheap checks first (model family and prediction type from configs, then the data), weights last.
    scheduler_config = check_model_family(args.pretrained_model_name_or_path, args.revision, args.cache_dir,
                                          want_sdxl=family.is_sdxl)  # fmt: skip
    check_local_pipeline(args, family.is_sdxl)
    seed = 0 if args.seed is None else args.seed
    if not args.precompute_inversion_cache:
        check_output_dir(args, family.is_sdxl)
    from_cache = args.inversion_cache_dir is not None and not args.precompute_inversion_cache
    if from_cache:
        fingerprint = cache_fingerprint(args, scheduler_config, family.is_sdxl)
        manifest = read_cache_manifest(args.inversion_cache_dir, fingerprint)
        pairs, collate_fn = CachedPairs(args.inversion_cache_dir, manifest, args.inversion_endpoint, args.seed), collate_cached
        logger.info(f"Training from the inversion cache {args.inversion_cache_dir}: {len(pairs)} pairs; no VAE, text "
                    "encoder, reference forward or inversion per step.")  # fmt: skip
        frozen = {}
    elif args.streaming:
        stream = load_preference_stream(args.dataset_name, args.dataset_split_name, args.cache_dir,
                                        args.shuffle_buffer_size, seed, accelerator.process_index,
                                        accelerator.num_processes)  # fmt: skip
        pairs = StreamingPairs(stream, args.resolution, args.random_crop, not args.no_hflip, seed, accelerator)
        collate_fn = collate_pairs
        frozen = family.load_frozen_models(args, accelerator)
    else:
        with accelerator.main_process_first():
            dataset = load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir,
                                              args.max_train_samples, args.seed, log=logger.info)  # fmt: skip
        pairs, collate_fn = PreferencePairs(dataset, args.resolution, args.random_crop, not args.no_hflip, seed), collate_pairs
        frozen = family.load_frozen_models(args, accelerator)
    unet = load_unet(args)

    if args.precompute_inversion_cache:
        reference = unet.requires_grad_(False).to(accelerator.device, dtype=weight_dtype_of(accelerator)).eval()
        step = family.make_step(frozen, args=args, accelerator=accelerator, unet=None, reference=reference,
                                inverse_scheduler=make_inverse_scheduler(scheduler_config, args.inversion_steps),
                                generator=None)  # fmt: skip
        precompute_inversion_cache(args, accelerator, dataset, step,
                                   cache_fingerprint(args, scheduler_config, family.is_sdxl), log=logger.info)  # fmt: skip
        accelerator.end_training()
        return

    def make_step(unet, reference, inverse_scheduler, generator):
        if from_cache:
            return CachedInpoStep(args, accelerator, unet, inverse_scheduler.alphas_cumprod,
                                  inverse_scheduler.config.prediction_type)  # fmt: skip
        return family.make_step(frozen, args=args, accelerator=accelerator, unet=unet, reference=reference,
                                inverse_scheduler=inverse_scheduler, generator=generator)  # fmt: skip

    run_training(args, accelerator, family, scheduler_config, pairs, collate_fn, unet, make_step,
                 functools.partial(family.make_pipeline, args, accelerator, **frozen))  # fmt: skip
