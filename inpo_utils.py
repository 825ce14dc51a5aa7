"""Shared pieces of the InPO training scripts: DDIM inversion, the implied-noise target and the InPO loss.

Notation (see README "How InPO works"): x0 are VAE latents, t a training timestep, alphas_cumprod[t] is ᾱ_t.
A batch of B preference pairs is laid out as 2B rows, winners first: rows [0, B) are the preferred images and
rows [B, 2B) the rejected ones, and row i and row B + i share their caption and their timestep.
"""

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
INVERSION_ENDPOINTS = ("grid", "exact")


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
                generator=None, added_cond_kwargs=None):  # fmt: skip
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
    Returns:
        (N, C, H, W) float32 inverted latents.
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

        if endpoint == "exact":
            alpha_from = torch.where(landed >= 0, alphas_cumprod[landed.clamp(min=0)], initial_alpha)
            all_rows = torch.arange(len(timesteps), device=x0.device)
            model_output = predict(latents, timesteps, all_rows)
            moved = ddim_inverse_step(latents, model_output, alpha_from, alphas_cumprod[timesteps],
                                      config.prediction_type, clip_range)  # fmt: skip
            latents = add_noise(moved, timesteps)
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
