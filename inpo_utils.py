"""The InPO method and its storage, shared by train_inpo.py and train_inpo_sdxl.py: DDIM inversion, the
implied-noise target, the InPO loss, the loss of one step from given UNets, latents and conditioning, and the
inversion cache format. Plain torch and diffusers schedulers: the scripts own arguments, data, models and the loop.

Notation (see README "What InPO does"): x0 are VAE latents, t a training timestep, alphas_cumprod[t] is ᾱ_t.
A batch of B preference pairs is laid out as 2B rows, winners first: rows [0, B) are the preferred images and
rows [B, 2B) the rejected ones, and row i and row B + i share their caption and their timestep.
"""

import functools
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler


SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
INVERSION_ENDPOINTS = ("grid", "exact")
LATENT_SOURCES = ("inversion", "forward", "inverted_noise", "hybrid")
NOISE_X0_PROJECTIONS = ("none", "remove")


# --------------------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------------------


def make_inverse_scheduler(scheduler_config, num_inversion_steps, device=None):
    """A `DDIMInverseScheduler` on the model's own noise schedule with a `num_inversion_steps`-point grid.

    The grid follows the model's `timestep_spacing`/`steps_offset` (SD 1.5: 1, 101, ..., 901 for 10 steps), which
    is what the InPO authors invert on. The schedule's ᾱ tensors are moved to `device` once, so the `.to(device)`
    of every step is free; the grid itself (`timesteps`) stays on the CPU, where the loops read it.
    """
    scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    if scheduler.config.prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"The model's scheduler predicts {scheduler.config.prediction_type!r}; InPO supports "
            f"{SUPPORTED_PREDICTION_TYPES}. Use an epsilon or v-prediction checkpoint."
        )
    scheduler.set_timesteps(num_inversion_steps)
    if device is not None:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        scheduler.initial_alpha_cumprod = scheduler.initial_alpha_cumprod.to(device)
    return scheduler


def ddim_inverse_step(
    sample, model_output, alpha_prod_from, alpha_prod_to, prediction_type="epsilon", clip_sample_range=None
):
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


def ddim_invert(
    unet,
    x0,
    timesteps,
    encoder_hidden_states,
    inverse_scheduler,
    eta=0.0,
    endpoint="grid",
    generator=None,
    added_cond_kwargs=None,
    return_trajectory=False,
    start_timestep=None,
):
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
        start_timestep: optional grid point τ0: `x0` is then already at level τ0 (e.g. forward-noised, as
            `hybrid_latents`) and the inversion continues from there over the grid points above τ0.
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
    # One read of the targets on the host instead of a `nonzero()` (a device sync) per grid point; CPU timesteps
    # (the whole-grid inversion of `inverted_noise`) cost no sync at all.
    targets = timesteps.tolist()
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
    landed = torch.full_like(timesteps, -1 if start_timestep is None else start_timestep)  # -1: still at x0
    trajectory = []
    with torch.no_grad():
        for grid_point in inverse_scheduler.timesteps.tolist():
            if start_timestep is not None and grid_point <= start_timestep:
                continue
            active = [row for row, target in enumerate(targets) if target > grid_point]
            if not active:
                continue
            rows = slice(None) if len(active) == len(targets) else torch.tensor(active, device=x0.device)
            source = grid_point - step_size
            alpha_from = alphas_cumprod[source] if source >= 0 else initial_alpha
            step_timesteps = torch.full((len(active),), grid_point, device=x0.device, dtype=torch.long)
            model_output = predict(latents[rows], step_timesteps, rows)
            moved = ddim_inverse_step(
                latents[rows], model_output, alpha_from, alphas_cumprod[grid_point], config.prediction_type, clip_range
            )
            latents[rows] = add_noise(moved, step_timesteps)
            landed[rows] = grid_point
            if return_trajectory:
                trajectory.append(latents.clone())

        if endpoint == "exact":
            alpha_from = torch.where(landed >= 0, alphas_cumprod[landed.clamp(min=0)], initial_alpha)
            all_rows = torch.arange(len(timesteps), device=x0.device)
            model_output = predict(latents, timesteps, all_rows)
            moved = ddim_inverse_step(
                latents, model_output, alpha_from, alphas_cumprod[timesteps], config.prediction_type, clip_range
            )
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


def hybrid_start_timestep(forward_until, inverse_scheduler):
    """τ0 for `hybrid_latents`: `forward_until` rounded down to a point of the inversion grid."""
    grid = [point for point in inverse_scheduler.timesteps.tolist() if point <= forward_until]
    return max(grid) if grid else 0


def hybrid_latents(
    unet,
    x0,
    timesteps,
    noise,
    start_timestep,
    encoder_hidden_states,
    inverse_scheduler,
    eta=0.0,
    endpoint="grid",
    added_cond_kwargs=None,
    generator=None,
):
    """Forward-noise up to τ0, DDIM-invert after: x_τ0 = √ᾱ_τ0·x0 + √(1−ᾱ_τ0)·ε, then `ddim_invert` from τ0 to t.

    Rows with t ≤ τ0 are plain forward noising at t (Diffusion-DPO's latent); above τ0 the trajectory's low-noise
    part, where DDIM inversion spreads noise worst over flat regions, is replaced by the forward process.

    Args: x0, noise (N, C, H, W); timesteps (N,) long; start_timestep τ0, a grid point (`hybrid_start_timestep`);
    the rest as `ddim_invert`. Returns (N, C, H, W) float32 latents; their implied noise is the target.
    """
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device, torch.float32)
    x0 = x0.float()
    latents = forward_noised(x0, noise, timesteps, alphas_cumprod)
    rows = (timesteps > start_timestep).nonzero().flatten()
    if rows.numel() == 0:
        return latents
    x_start = forward_noised(x0[rows], noise[rows], torch.full_like(rows, start_timestep), alphas_cumprod)
    latents[rows] = ddim_invert(
        unet,
        x_start,
        timesteps[rows],
        encoder_hidden_states[rows],
        inverse_scheduler,
        eta=eta,
        endpoint=endpoint,
        generator=generator,
        added_cond_kwargs={k: v[rows] for k, v in (added_cond_kwargs or {}).items()},
        start_timestep=start_timestep,
    )
    return latents


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


def inverted_noise(
    inversion_unet,
    x0,
    encoder_hidden_states,
    inverse_scheduler,
    x0_projection="remove",
    eta=0.0,
    added_cond_kwargs=None,
    generator=None,
):
    """The noise DDIM inversion assigns to each image: invert x0 to the last grid point τ_K and take its implied
    noise ε_T; with x0_projection="remove" take out its x0 component (`remove_x0_component`); then `standardise`.

    The reparametrized-DDIM reading of InPO: one noise per image (independent of t, so it can be computed once),
    used like Diffusion-DPO's ε at any t. Args: x0 (N, C, H, W), encoder_hidden_states (N, L, D). Returns
    (N, C, H, W) float32.
    """
    if x0_projection not in NOISE_X0_PROJECTIONS:
        raise ValueError(f"x0_projection must be one of {NOISE_X0_PROJECTIONS}, got {x0_projection!r}")
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    last = torch.full((len(x0),), int(inverse_scheduler.timesteps[-1]), dtype=torch.long)
    # "exact" onto the last grid point is the full grid inversion: its final step is the grid step onto τ_K.
    x_inv = ddim_invert(
        inversion_unet,
        x0,
        last,
        encoder_hidden_states,
        inverse_scheduler,
        eta=eta,
        endpoint="exact",
        generator=generator,
        added_cond_kwargs=added_cond_kwargs,
    )
    noise = implied_noise(x_inv, x0.float(), last.to(x0.device), alphas_cumprod)
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


LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def inpo_loss(policy_error_w, policy_error_l, reference_error_w, reference_error_l, beta, loss_type="sigmoid"):
    """The InPO (Diffusion-DPO form) loss on B pairs.

    logits = (e_ref,w − e_ref,l) − (e_θ,w − e_θ,l),  inside = ½·β·logits, i.e.
    inside = −½·β·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)], and per `loss_type`, averaged over pairs:
      sigmoid: −log σ(inside)              (the paper's loss)
      hinge:   max(0, 1 − β·logits)        (as diffusers' train_diffusion_dpo.py)
      ipo:     (logits − 1/(2·β))²         (as diffusers' train_diffusion_dpo.py, with β = beta_dpo)

    `inside` is also the implicit reward margin r_w − r_l with r = −½·β·(e_θ − e_ref). Accuracy counts
    inside > 0 as 1 and a tie (inside == 0) as ½.

    Args: four (B,) per-sample errors from `per_sample_mse`; beta a float; loss_type one of LOSS_TYPES.
    Returns: (loss, metrics) with loss a scalar tensor (with grad through the policy errors) and metrics a dict
    of float scalar tensors: loss, implicit_acc, reward_margin, policy_mse, reference_mse (means over all 2B rows).
    """
    logits = (reference_error_w - reference_error_l) - (policy_error_w - policy_error_l)
    inside = 0.5 * beta * logits
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inside).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * logits).mean()
    elif loss_type == "ipo":
        loss = ((logits - 1 / (2 * beta)) ** 2).mean()
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}.")
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
# The loss of one training step, from given UNets, latents and conditioning
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


def source_latents(
    x0,
    timesteps,
    latent_source,
    inversion_unet,
    encoder_hidden_states,
    inverse_scheduler,
    alphas_cumprod,
    eta=0.0,
    endpoint="grid",
    added_cond_kwargs=None,
    generator=None,
    x0_projection="remove",
    fresh_noise_mix=0.0,
    hybrid_start=0,
):
    """The noisy latents the loss is scored at and the noise they imply, for 2B rows laid out winners first.

    latent_source="inversion" (InPO): DDIM inversion of x0 up to t, target ε* = implied noise.
    latent_source="forward" (Diffusion-DPO): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε with one ε shared by both images of a pair.
    latent_source="inverted_noise": the same forward formula with each image's own `inverted_noise` ε' (x0 part
    handled by `x0_projection`), mixed with a share `fresh_noise_mix` of pair-shared fresh noise
    (`mix_fresh_noise`). `endpoint` does not apply: the inversion always runs to the last grid point.
    latent_source="hybrid": forward noising (pair-shared ε) up to the grid point `hybrid_start`, DDIM inversion
    from there to t (`hybrid_latents`), target ε* = implied noise.

    Returns: (latents (2B, C, H, W) float32, noise (2B, C, H, W) float32).
    """
    if latent_source == "inversion":
        x_inv = ddim_invert(
            inversion_unet,
            x0,
            timesteps,
            encoder_hidden_states,
            inverse_scheduler,
            eta=eta,
            endpoint=endpoint,
            generator=generator,
            added_cond_kwargs=added_cond_kwargs,
        )
        return x_inv, implied_noise(x_inv, x0.float(), timesteps, alphas_cumprod)
    if latent_source == "forward":
        noise = pair_shared_noise(x0, generator)
        return forward_noised(x0.float(), noise, timesteps, alphas_cumprod), noise
    if latent_source == "inverted_noise":
        noise = inverted_noise(
            inversion_unet,
            x0,
            encoder_hidden_states,
            inverse_scheduler,
            x0_projection,
            eta,
            added_cond_kwargs,
            generator,
        )
        if fresh_noise_mix > 0:
            noise = mix_fresh_noise(noise, pair_shared_noise(x0, generator), fresh_noise_mix)
        return forward_noised(x0.float(), noise, timesteps, alphas_cumprod), noise
    if latent_source == "hybrid":
        latents = hybrid_latents(
            inversion_unet,
            x0,
            timesteps,
            pair_shared_noise(x0, generator),
            hybrid_start,
            encoder_hidden_states,
            inverse_scheduler,
            eta,
            endpoint,
            added_cond_kwargs,
            generator,
        )
        return latents, implied_noise(latents, x0.float(), timesteps, alphas_cumprod)
    raise ValueError(f"latent_source must be one of {LATENT_SOURCES}, got {latent_source!r}")


def reference_errors_at(reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    """e_ref per row: the frozen reference's error at (latents, t, c), without grad. Shapes as `score_pairs`."""
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    with torch.no_grad():
        prediction = reference_unet(
            latents.to(reference_unet.dtype), timesteps, encoder_hidden_states, **model_kwargs
        ).sample
    return per_sample_mse(prediction, target)


def score_pairs(
    policy_unet,
    latents,
    target,
    timesteps,
    encoder_hidden_states,
    reference_errors,
    beta,
    added_cond_kwargs=None,
    loss_type="sigmoid",
    policy_dtype=torch.float32,
):
    """The policy's errors at (latents, t, c) against `target`, turned into the InPO loss with e_ref.

    The policy's inputs are cast to `policy_dtype`, the dtype of its trainable weights: float32 under accelerate's
    mixed precision (autocast runs the matmuls in half precision), bf16/fp16 under DeepSpeed, which casts the whole
    module and runs no autocast.

    Args: latents, target (2B, C, H, W) winners first; timesteps (2B,); encoder_hidden_states (2B, L, D);
    reference_errors (2B,). Returns (loss, metrics) as `inpo_loss`, metrics also holding the mean timestep.
    """
    added_cond_kwargs = {k: v.to(policy_dtype) for k, v in (added_cond_kwargs or {}).items()}
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    prediction = policy_unet(
        latents.to(policy_dtype), timesteps, encoder_hidden_states.to(policy_dtype), **model_kwargs
    ).sample
    policy_errors = per_sample_mse(prediction, target)
    reference_errors = reference_errors.to(policy_errors)
    loss, metrics = inpo_loss(*policy_errors.chunk(2), *reference_errors.chunk(2), beta, loss_type)
    metrics["timestep"] = timesteps.float().mean()
    return loss, metrics


def inpo_step_loss(
    policy_unet,
    reference_unet,
    inversion_unet,
    x0,
    encoder_hidden_states,
    inverse_scheduler,
    beta,
    latent_source="inversion",
    eta=0.0,
    endpoint="grid",
    added_cond_kwargs=None,
    timesteps=None,
    generator=None,
    loss_type="sigmoid",
    x0_projection="remove",
    fresh_noise_mix=0.0,
    hybrid_start=0,
    timestep_range=None,
    policy_dtype=torch.float32,
):
    """Online InPO loss and metrics for B pairs: sample t, build the noisy latents, score policy against reference.

    Args:
        policy_unet: the trained UNet (called with grad).
        reference_unet: the frozen reference (called without grad).
        inversion_unet: the UNet that inverts (the policy for the authors' online InPO, or the reference).
        x0: (2B, C, H, W) latents, winners first. encoder_hidden_states: (2B, L, D).
        timesteps: optional (B,) per-pair timesteps; when None, sampled uniformly from {low, ..., high−1} with
            (low, high) = `timestep_range`, by default (0, T).
        latent_source, eta, endpoint, x0_projection, fresh_noise_mix, hybrid_start: as `source_latents`.
        policy_dtype: as `score_pairs`.
    Returns: (loss, metrics) as `score_pairs`.
    """
    num_pairs = len(x0) // 2
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    if timesteps is None:
        low, high = timestep_range or (0, inverse_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(low, high, (num_pairs,), device=x0.device, generator=generator)
    timesteps = timesteps.to(x0.device).long().repeat(2)
    latents, noise = source_latents(
        x0,
        timesteps,
        latent_source,
        inversion_unet,
        encoder_hidden_states,
        inverse_scheduler,
        alphas_cumprod,
        eta,
        endpoint,
        added_cond_kwargs,
        generator,
        x0_projection,
        fresh_noise_mix,
        hybrid_start,
    )
    target = regression_target(noise, x0.float(), timesteps, alphas_cumprod, inverse_scheduler.config.prediction_type)
    reference_errors = reference_errors_at(
        reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs
    )
    return score_pairs(
        policy_unet,
        latents,
        target,
        timesteps,
        encoder_hidden_states,
        reference_errors,
        beta,
        added_cond_kwargs,
        loss_type,
        policy_dtype,
    )


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
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "scheduler": {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")},
        "dataset": args.dataset_name,
        "split": args.dataset_split_name,
        "max_train_samples": args.max_train_samples,
        "seed": args.seed,
        "resolution": args.resolution,
        "random_crop": args.random_crop,
        "hflip": not args.no_hflip,
        "proportion_empty_prompts": args.proportion_empty_prompts,
        "inversion_steps": args.inversion_steps,
        "inversion_eta": args.inversion_eta,
        "inversion_endpoint": args.inversion_endpoint,
        "cache_timesteps": args.cache_timesteps,
        "cache_dtype": args.cache_dtype,
        "latent_source": args.latent_source,
        "noise_x0_projection": args.noise_x0_projection,
    }
    if is_sdxl:
        fingerprint.update(vae=args.pretrained_vae_model_name_or_path, fixed_time_ids=args.fixed_time_ids)
    return json.loads(json.dumps(fingerprint))  # normalise tuples/floats as they will read back


def fingerprint_differences(stored, current):
    """Human-readable list of the settings that differ between two fingerprints."""
    keys = sorted(set(stored) | set(current))
    return [
        f"{k}: cache has {stored.get(k)!r}, this run has {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


def read_cache_manifest(cache_dir, fingerprint):
    """The manifest of a complete cache made with `fingerprint`; a clear error for a missing, partial or stale one."""
    manifest_path = os.path.join(cache_dir, CACHE_MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        state = (
            "is incomplete (no manifest.json: the precompute did not finish)"
            if os.path.isdir(cache_dir)
            else "does not exist"
        )
        raise ValueError(
            f"Inversion cache {cache_dir!r} {state}. Run the same command with "
            "--precompute_inversion_cache first; it resumes where it stopped."
        )
    with open(manifest_path) as f:
        manifest = json.load(f)
    differences = fingerprint_differences(manifest["fingerprint"], fingerprint)
    if differences:
        raise ValueError(
            f"Inversion cache {cache_dir!r} was made with other settings; precompute a new cache or "
            "train with the cache's settings:\n  " + "\n  ".join(differences)
        )
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


def write_cache_fingerprint(cache_dir, fingerprint):
    """Create `cache_dir` and record `fingerprint` in it; refuse a folder that holds a cache made otherwise."""
    os.makedirs(cache_dir, exist_ok=True)
    fingerprint_path = os.path.join(cache_dir, CACHE_FINGERPRINT_FILE)
    if os.path.isfile(fingerprint_path):
        with open(fingerprint_path) as f:
            differences = fingerprint_differences(json.load(f), fingerprint)
        if differences:
            raise ValueError(
                f"{cache_dir!r} holds a cache made with other settings; use another "
                "--inversion_cache_dir or delete it:\n  " + "\n  ".join(differences)
            )
    with open(fingerprint_path, "w") as f:
        json.dump(fingerprint, f, indent=1)


def cache_rows(
    reference_unet,
    x0,
    encoder_hidden_states,
    inverse_scheduler,
    cache_timesteps,
    cache_dtype,
    eta=0.0,
    endpoint="grid",
    added_cond_kwargs=None,
    generator=None,
    latent_source="inversion",
    x0_projection="remove",
):
    """Cache entries for one batch of B pairs, in per-pair layout (B, 2, ...) with the winner at index 0.

    x0, the conditioning and the inverted latents are rounded to `cache_dtype` before the reference's errors are
    computed on them, so e_ref is computed on exactly what training reads back. cache_timesteps="grid" stores the
    whole inversion trajectory and e_ref at every grid point; "per_pair" one latent at a uniformly drawn t. With
    latent_source="inverted_noise" each image's `inverted_noise` is stored instead of latents ("noise"): training
    forward-noises x0 with it at any t, and e_ref is stored at the grid points or the drawn t, or not at all with
    cache_timesteps="none" (for training with fresh noise, which draws t and computes e_ref at every step).

    Args: x0 (2B, C, H, W) winners first; encoder_hidden_states (2B, L, D); added_cond_kwargs (2B, ...) tensors.
    Returns: dict of tensors (x0, latents or noise, reference_errors, encoder_hidden_states, [timesteps],
    added_cond.*).
    """

    def as_stored(tensor):
        return tensor.to(CACHE_DTYPES[cache_dtype]).float()

    x0 = as_stored(x0)
    encoder_hidden_states = as_stored(encoder_hidden_states).to(encoder_hidden_states.dtype)
    if added_cond_kwargs:
        added_cond_kwargs = {k: as_stored(v).to(v.dtype) for k, v in added_cond_kwargs.items()}
    num_pairs = len(x0) // 2
    config = inverse_scheduler.config
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    grid = inverse_scheduler.timesteps.to(x0.device)

    def errors_at(latents, timesteps):
        noise = implied_noise(latents, x0, timesteps, alphas_cumprod)
        target = regression_target(noise, x0, timesteps, alphas_cumprod, config.prediction_type)
        return reference_errors_at(
            reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs
        )

    def noised_errors_at(noise, timesteps):
        return errors_at(forward_noised(x0, noise, timesteps, alphas_cumprod), timesteps)

    def per_pair(tensor):  # (2B, ...) winners first → (B, 2, ...)
        return torch.stack(tensor.chunk(2), dim=1)

    invert = functools.partial(
        ddim_invert,
        reference_unet,
        x0,
        encoder_hidden_states=encoder_hidden_states,
        inverse_scheduler=inverse_scheduler,
        eta=eta,
        generator=generator,
        added_cond_kwargs=added_cond_kwargs,
    )
    if cache_timesteps == "none" and latent_source != "inverted_noise":
        raise ValueError(
            'cache_timesteps="none" stores no latents, only inverted noise: latent_source="inverted_noise".'
        )
    if latent_source == "inverted_noise":  # one noise per image; x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise at any t
        noise = inverted_noise(
            reference_unet,
            x0,
            encoder_hidden_states,
            inverse_scheduler,
            x0_projection,
            eta,
            added_cond_kwargs,
            generator,
        )
        noise = as_stored(noise)
        if cache_timesteps == "none":
            rows = {"noise": per_pair(noise)}
        elif cache_timesteps == "grid":
            errors = [noised_errors_at(noise, grid[k].repeat(len(x0))) for k in range(len(grid))]
            rows = {"noise": per_pair(noise), "reference_errors": per_pair(torch.stack(errors, dim=-1))}
        else:
            timesteps = torch.randint(
                0, config.num_train_timesteps, (num_pairs,), generator=generator, device=x0.device
            ).repeat(2)
            rows = {
                "noise": per_pair(noise),
                "reference_errors": per_pair(noised_errors_at(noise, timesteps)),
                "timesteps": timesteps[:num_pairs],
            }
    elif cache_timesteps == "grid":
        beyond_grid = torch.full((len(x0),), config.num_train_timesteps, device=x0.device)
        _, trajectory = invert(beyond_grid, return_trajectory=True)
        trajectory = as_stored(trajectory)
        inputs = grid_inversion_inputs(x0, trajectory, endpoint)
        errors = torch.stack([errors_at(inputs[k], grid[k].repeat(len(x0))) for k in range(len(grid))], dim=-1)
        rows = {"latents": per_pair(trajectory.transpose(0, 1)), "reference_errors": per_pair(errors)}
    else:
        timesteps = torch.randint(
            0, config.num_train_timesteps, (num_pairs,), generator=generator, device=x0.device
        ).repeat(2)
        latents = as_stored(invert(timesteps, endpoint=endpoint))
        rows = {
            "latents": per_pair(latents),
            "reference_errors": per_pair(errors_at(latents, timesteps)),
            "timesteps": timesteps[:num_pairs],
        }
    rows["x0"] = per_pair(x0)
    rows["encoder_hidden_states"] = encoder_hidden_states[:num_pairs]
    for name, value in (added_cond_kwargs or {}).items():
        rows[f"added_cond.{name}"] = per_pair(value)
    return rows


def write_shard(cache_dir, index, columns, cache_dtype):
    """Write shard `index` from lists of per-batch tensors, floats (but e_ref) in `cache_dtype`: to a temporary
    file, then renamed, so a killed precompute never leaves a half-written shard. Returns its size in bytes."""
    from safetensors.torch import save_file

    store_dtype = CACHE_DTYPES[cache_dtype]
    tensors = {name: torch.cat(values).contiguous() for name, values in columns.items()}
    tensors = {
        name: value.to(store_dtype) if value.is_floating_point() and name != "reference_errors" else value
        for name, value in tensors.items()
    }
    path = shard_file(cache_dir, index)
    save_file(tensors, path + ".partial")
    os.replace(path + ".partial", path)
    return os.path.getsize(path)


def write_cache_manifest(cache_dir, fingerprint, num_shards, grid, seconds, log=print):
    """Write manifest.json once every shard is there: what marks a cache complete."""
    from safetensors import safe_open

    missing = [i for i in range(num_shards) if not os.path.isfile(shard_file(cache_dir, i))]
    if missing:
        raise RuntimeError(f"Cache shards {missing[:5]} are missing after the precompute; run it again to finish.")
    num_pairs, total_bytes = 0, 0
    for i in range(num_shards):
        with safe_open(shard_file(cache_dir, i), framework="pt") as f:
            num_pairs += f.get_slice("x0").get_shape()[0]
        total_bytes += os.path.getsize(shard_file(cache_dir, i))
    manifest = {
        "fingerprint": fingerprint,
        "num_pairs": num_pairs,
        "num_shards": num_shards,
        "grid_timesteps": grid,
        "bytes": total_bytes,
        "bytes_per_pair": total_bytes / max(num_pairs, 1),
        "seconds_last_run": seconds,
    }
    with open(os.path.join(cache_dir, CACHE_MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    log(
        f"Inversion cache complete: {num_pairs} pairs in {num_shards} shards, {total_bytes / 2**20:.1f} MiB "
        f"({manifest['bytes_per_pair'] / 1024:.1f} KiB per pair)."
    )


class CachedPairs(torch.utils.data.Dataset):
    """Pairs read back from a cache. With grid timesteps each read draws one grid point k from a generator seeded
    by (seed, epoch, index), so resumed runs see the same timesteps as uninterrupted ones (`cached_step_loss`
    draws its own t instead when it mixes in fresh noise)."""

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
        self.stores_reference_errors = "reference_errors" in self.keys
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
        example = {
            "x0": x0,
            source: self._read(shard, source, row),
            "encoder_hidden_states": self._read(shard, "encoder_hidden_states", row),
        }
        if self.per_pair_timesteps:
            example["timestep"] = self._read(shard, "timesteps", row)
            example["reference_errors"] = self._read(shard, "reference_errors", row)
        elif self.stores_reference_errors:  # grid layout: one grid point k per read
            k = int(np.random.default_rng((self.seed, self.epoch, index)).integers(len(self.grid)))
            example["timestep"] = self.grid[k]
            if source == "latents":  # (2, K, C, H, W): the trajectory
                example[source] = grid_inversion_inputs(x0, example[source].transpose(0, 1), self.endpoint)[k]
            example["reference_errors"] = self._read(shard, "reference_errors", row)[:, k]
        for key in self.keys:
            if key.startswith("added_cond."):
                example[key] = self._read(shard, key, row)
        return example


def collate_cached(examples):
    """Batch cached pairs as 2B rows, winners first (the layout of `collate_pairs`); "latents" or, from an
    inverted-noise cache, "noise"; "timesteps" and "reference_errors" None from a noise-only cache."""

    def winners_then_losers(key):
        stacked = torch.stack([example[key] for example in examples])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])

    hidden = torch.stack([example["encoder_hidden_states"] for example in examples])
    source = "noise" if "noise" in examples[0] else "latents"
    stores_reference_errors = "reference_errors" in examples[0]
    return {
        "x0": winners_then_losers("x0"),
        source: winners_then_losers(source),
        "reference_errors": winners_then_losers("reference_errors") if stores_reference_errors else None,
        "timesteps": torch.stack([torch.as_tensor(example["timestep"]) for example in examples])
        if stores_reference_errors
        else None,
        "encoder_hidden_states": torch.cat([hidden, hidden]),
        "added_cond_kwargs": {
            key[len("added_cond.") :]: winners_then_losers(key) for key in examples[0] if key.startswith("added_cond.")
        }
        or None,
    }


def cached_step_loss(
    policy_unet,
    x0,
    latents,
    timesteps,
    encoder_hidden_states,
    reference_errors,
    alphas_cumprod,
    prediction_type,
    beta,
    added_cond_kwargs=None,
    loss_type="sigmoid",
    noise=None,
    fresh_noise_mix=0.0,
    reference_unet=None,
    generator=None,
    timestep_range=None,
    policy_dtype=torch.float32,
):
    """InPO loss and metrics for B pairs read from the cache: one policy forward (and, with fresh noise, one
    reference forward without grad).

    With `fresh_noise_mix` > 0 (inverted-noise cache only) the step is online training's on the stored noise: t
    drawn uniformly from [low, high) = `timestep_range` (default [0, T)) instead of the cache's timesteps, the
    noise mixed with pair-shared fresh noise (`mix_fresh_noise`), and e_ref computed anew by `reference_unet`
    without grad (the stored e_ref belongs to the unmixed noise at the cache's timesteps). The inversion, the
    expensive part, still comes from the cache.

    Args: x0, latents (2B, C, H, W) winners first, or latents None and `noise` (2B, C, H, W) from an
    inverted-noise cache; timesteps (B,) per pair; encoder_hidden_states (2B, L, D); reference_errors (2B,) the
    stored e_ref (timesteps and reference_errors unused with fresh noise, and None from a noise-only cache);
    policy_dtype as `score_pairs`. Returns (loss, metrics) as `score_pairs`.
    """
    if fresh_noise_mix > 0 and (noise is None or reference_unet is None):
        raise ValueError("fresh_noise_mix needs an inverted-noise cache (`noise`) and the `reference_unet`.")
    if fresh_noise_mix == 0 and reference_errors is None:
        raise ValueError("This cache stores no reference errors (noise only); it trains with fresh_noise_mix > 0.")
    alphas_cumprod = alphas_cumprod.to(x0.device)
    if fresh_noise_mix > 0:
        low, high = timestep_range or (0, len(alphas_cumprod))
        timesteps = torch.randint(low, high, (len(x0) // 2,), device=x0.device, generator=generator)
    timesteps = timesteps.to(x0.device).long().repeat(2)
    if noise is None:
        noise = implied_noise(latents, x0, timesteps, alphas_cumprod)
    else:
        if fresh_noise_mix > 0:
            noise = mix_fresh_noise(noise, pair_shared_noise(x0, generator), fresh_noise_mix)
        latents = forward_noised(x0, noise, timesteps, alphas_cumprod)
    target = regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type)
    if fresh_noise_mix > 0:
        reference_errors = reference_errors_at(
            reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs
        )
    return score_pairs(
        policy_unet,
        latents,
        target,
        timesteps,
        encoder_hidden_states,
        reference_errors,
        beta,
        added_cond_kwargs,
        loss_type,
        policy_dtype,
    )
