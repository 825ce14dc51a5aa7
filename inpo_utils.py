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
"""The InPO method and its cache format, shared by train_inpo.py, train_inpo_sdxl.py and train_inpo_sd3.py (plain
torch and diffusers schedulers; the scripts own arguments, data, models and the loop). x0 are VAE latents, t a training
timestep, alphas_cumprod[t] is ᾱ_t; for flow matching (SD3) t is σ in [0, 1] and x_σ = (1 − σ)·x0 + σ·ε. B preference
pairs are 2B rows, winners first: rows [0, B) preferred, [B, 2B) rejected, row i and row B + i sharing caption and t.
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors import safe_open
from safetensors.torch import save_file


SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_MATCH = "flow_match"  # rectified flow: the model predicts the velocity ε − x0
LATENT_SOURCES = ("inverted_noise", "inversion", "forward")


# -- DDIM inversion --------------------------------------------------------------------------------------------


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

    Args: sample (N, C, H, W) latents at level ᾱ_from; model_output (N, C, H, W) in the `prediction_type`
    parameterisation; alpha_prod_from, alpha_prod_to scalars or (N,) tensors. Returns (N, C, H, W) at level ᾱ_to.
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
    """σ(τ+Δ, τ), std of the DDIM/DDPM posterior between grid point τ and the next, τ+Δ: σ² = (1 − ᾱ_τ)/(1 − ᾱ_{τ+Δ})
    · (1 − ᾱ_{τ+Δ}/ᾱ_τ), as `DDIMScheduler._get_variance(τ+Δ, τ)`. The authors add `eta · σ · N(0, I)` after each
    inverse step landing on τ; τ+Δ is clamped to T−1 (their code indexes past the schedule there).

    Args: alphas_cumprod (T,) ᾱ of the schedule; landed_timesteps (N,) long, the τ just reached. Returns (N,).
    """
    num_train_timesteps = alphas_cumprod.shape[0]
    alpha_here = alphas_cumprod[landed_timesteps]
    alpha_next = alphas_cumprod[(landed_timesteps + step_size).clamp(max=num_train_timesteps - 1)]
    variance = (1 - alpha_here) / (1 - alpha_next) * (1 - alpha_next / alpha_here)
    return variance.clamp(min=0).sqrt()


def ddim_invert(unet, x0, timesteps, encoder_hidden_states, inverse_scheduler, eta=0.0, generator=None,
        added_cond_kwargs=None):  # fmt: skip
    """Run DDIM inversion of clean latents `x0` up to the last grid point below timestep `timesteps[i]`, per
    sample, without grad (the InPO authors' inversion).

    For each grid point τ of `inverse_scheduler` with τ < t, the latents move from level τ−Δ (or the scheduler's
    initial ᾱ for the first step) to level τ with the UNet evaluated at τ: the `DDIMInverseScheduler.step`
    convention. After each step, if eta > 0, `eta · σ(τ+Δ, τ) · N(0, I)` is added (`inversion_noise_std`). The
    returned latent sits at level τ_last, not t, as in the authors' code; t ≥ T inverts over the whole grid.

    Args: unet, a `UNet2DConditionModel` (or anything called alike returning `.sample`); x0 (N, C, H, W) clean
    latents; timesteps (N,) long targets t (on the CPU they cost no device sync); encoder_hidden_states (N, L, D);
    inverse_scheduler from `make_inverse_scheduler`; added_cond_kwargs optional (N, ...) tensors (SDXL's
    `text_embeds`, `time_ids`). Returns (N, C, H, W) float32 inverted latents.
    """
    config = inverse_scheduler.config
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device, torch.float32)
    initial_alpha = inverse_scheduler.initial_alpha_cumprod.to(x0.device, torch.float32)
    step_size = config.num_train_timesteps // inverse_scheduler.num_inference_steps
    clip_range = config.clip_sample_range if config.clip_sample else None
    # One read of the targets on the host instead of a `nonzero()` (a device sync) per grid point.
    targets = timesteps.tolist()
    added_cond_kwargs = added_cond_kwargs or {}

    latents = x0.float().clone()
    with torch.no_grad():
        for grid_point in inverse_scheduler.timesteps.tolist():
            active = [row for row, target in enumerate(targets) if target > grid_point]
            if not active:
                continue
            rows = slice(None) if len(active) == len(targets) else torch.tensor(active, device=x0.device)
            source = grid_point - step_size
            alpha_from = alphas_cumprod[source] if source >= 0 else initial_alpha
            step_timesteps = torch.full((len(active),), grid_point, device=x0.device, dtype=torch.long)
            subset_kwargs = {k: v[rows] for k, v in added_cond_kwargs.items()}
            model_kwargs = {"added_cond_kwargs": subset_kwargs} if subset_kwargs else {}
            model_output = unet(
                latents[rows].to(unet.dtype), step_timesteps, encoder_hidden_states[rows], **model_kwargs
            ).sample.float()
            moved = ddim_inverse_step(
                latents[rows], model_output, alpha_from, alphas_cumprod[grid_point], config.prediction_type, clip_range
            )
            if eta > 0:
                std = inversion_noise_std(alphas_cumprod, step_timesteps, step_size)
                noise = torch.randn(moved.shape, generator=generator, device=moved.device, dtype=moved.dtype)
                moved = moved + eta * _per_sample(std, moved) * noise
            latents[rows] = moved
    return latents


# -- Flow matching (SD3): ODE inversion on the model's σ schedule ----------------------------------------------


class FlowMatchingSchedule:
    """What the functions below need of a flow-matching model's schedule, in the place of a DDIM inverse scheduler:
    the inversion grid `sigmas` (K + 1 ascending σ, 0 then the sampler's K σ of `FlowMatchEulerDiscreteScheduler`
    with the model's shift, ending at 1), and training σ drawn as diffusers' SD3 scripts draw them (u from
    `compute_density_for_timestep_sampling`, σ = the shifted training σ at index ⌊u·T⌋). Here t is σ."""

    prediction_type = FLOW_MATCH

    def __init__(self, scheduler_config, num_inversion_steps, weighting_scheme="logit_normal", logit_mean=0.0,
                 logit_std=1.0, mode_scale=1.29, device=None):  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.config, self.num_inference_steps = scheduler.config, num_inversion_steps
        self.training_sigmas = scheduler.sigmas.float().to(device)
        scheduler.set_timesteps(num_inversion_steps)
        self.sigmas = scheduler.sigmas.float().flip(0)
        self.density = {"weighting_scheme": weighting_scheme, "logit_mean": logit_mean, "logit_std": logit_std,
                        "mode_scale": mode_scale}  # fmt: skip

    def sample_sigmas(self, num, generator=None, device=None):
        """(num,) training σ from the density, drawn with `generator` (on its device)."""
        device = generator.device if generator is not None else device
        u = compute_density_for_timestep_sampling(batch_size=num, device=device, generator=generator, **self.density)
        indices = (u * self.config.num_train_timesteps).long().clamp(max=len(self.training_sigmas) - 1)
        return self.training_sigmas.to(u.device)[indices]


def flow_match_invert(model, x0, sigmas, encoder_hidden_states, added_cond_kwargs=None):
    """Integrate dx/dσ = v(x, σ) from x0 at σ = 0 over the ascending grid `sigmas` by Euler steps, without grad:
    x_{k+1} = x_k + (σ_{k+1} − σ_k) · v(x_k, σ_{k+1}), the sampler's Euler step run backwards with the velocity read
    at the level being reached (the convention of `DDIMInverseScheduler`, which also never calls the model at σ = 0).

    Args: model called as model(x, σ (N,), encoder_hidden_states, added_cond_kwargs=...) returning `.sample`; x0
    (N, C, H, W); sigmas (K + 1,) ascending from 0; encoder_hidden_states (N, L, D); added_cond_kwargs optional
    (N, ...) tensors (SD3's `pooled_projections`). Returns (N, C, H, W) float32 latents at σ = sigmas[-1].
    """
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    latents = x0.float().clone()
    with torch.no_grad():
        for sigma_from, sigma_to in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            level = torch.full((len(x0),), sigma_to, device=x0.device)
            velocity = model(latents.to(model.dtype), level, encoder_hidden_states, **model_kwargs).sample
            latents = latents + (sigma_to - sigma_from) * velocity.float()
    return latents


# -- Targets and loss ------------------------------------------------------------------------------------------


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
    """Zero mean and unit std per sample over (C, H, W), so it can stand in for N(0, I) noise at any level (inverted
    noise is far narrower, std ~0.3-0.5 on the benchmark's images). Args: (N, C, H, W). Returns (N, C, H, W)."""
    dims = list(range(1, noise.ndim))
    centred = noise - noise.mean(dim=dims, keepdim=True)
    return centred / centred.std(dim=dims, keepdim=True).clamp(min=1e-12)


def share_within_pairs(noise):
    """standardise((ε_w + ε_l)/√2) for both rows of each pair: one noise per pair, as Diffusion-DPO shares its fresh
    noise, so that the pair's comparison is not also one between two noises. (2B, C, H, W) winners first → same."""
    winners, losers = noise.chunk(2)
    shared = standardise((winners + losers) / math.sqrt(2))
    return torch.cat([shared, shared])


def mix_fresh_noise(noise, fresh, mix):
    """√(1 − λ) · ε + √λ · ξ: unit variance when ε and ξ are independent with unit variance. λ = `mix` in [0, 1].

    Args: noise, fresh (N, C, H, W). Returns (N, C, H, W).
    """
    return math.sqrt(1 - mix) * noise + math.sqrt(mix) * fresh


def forward_noised(x0, noise, timesteps, alphas_cumprod):
    """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε. Args: x0, noise (N, C, H, W); timesteps (N,). Returns (N, C, H, W)."""
    a_t = _per_sample(alphas_cumprod.to(x0.device)[timesteps], noise)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def flow_match_noised(x0, noise, sigmas):
    """x_σ = (1 − σ) · x0 + σ · ε. Args: x0, noise (N, C, H, W); sigmas (N,) in [0, 1]. Returns (N, C, H, W)."""
    sigmas = _per_sample(sigmas, noise)
    return (1 - sigmas) * x0 + sigmas * noise


def noised_latents(x0, noise, timesteps, alphas_cumprod, prediction_type):
    """The forward process of the model's kind: `flow_match_noised` (timesteps are σ), else `forward_noised`."""
    if prediction_type == FLOW_MATCH:
        return flow_match_noised(x0, noise, timesteps)
    return forward_noised(x0, noise, timesteps, alphas_cumprod)


def flow_match_inverted_noise(model, x0, encoder_hidden_states, schedule, added_cond_kwargs=None):
    """`inverted_noise` for flow matching: `flow_match_invert` of x0 over the whole grid to σ_K, its implied noise
    ε = (x_σK − (1 − σ_K)·x0)/σ_K (x_σK itself at σ_K = 1), its x0 component removed, standardised. Args as
    `flow_match_invert`, schedule a `FlowMatchingSchedule`. Returns (N, C, H, W) float32."""
    x_inv = flow_match_invert(model, x0, schedule.sigmas, encoder_hidden_states, added_cond_kwargs)
    last = float(schedule.sigmas[-1])
    noise = (x_inv - (1 - last) * x0.float()) / last
    return standardise(remove_x0_component(noise, x0.float()))


def inverted_noise(reference_unet, x0, encoder_hidden_states, inverse_scheduler, added_cond_kwargs=None):
    """The noise DDIM inversion assigns to each image: invert x0 over the whole grid (eta 0) to τ_K, take the
    implied noise ε_T, take out its x0 component (`remove_x0_component`), then `standardise`.

    The reparametrized-DDIM reading of InPO: one noise per image (independent of t, so it can be computed once),
    used like Diffusion-DPO's ε at any t. Args: x0 (N, C, H, W), encoder_hidden_states (N, L, D). Returns
    (N, C, H, W) float32. With a `FlowMatchingSchedule`, `flow_match_inverted_noise`.
    """
    if isinstance(inverse_scheduler, FlowMatchingSchedule):
        schedule = inverse_scheduler
        return flow_match_inverted_noise(reference_unet, x0, encoder_hidden_states, schedule, added_cond_kwargs)
    alphas_cumprod = inverse_scheduler.alphas_cumprod.to(x0.device)
    beyond_grid = torch.full((len(x0),), inverse_scheduler.config.num_train_timesteps)
    x_inv = ddim_invert(
        reference_unet, x0, beyond_grid, encoder_hidden_states, inverse_scheduler, added_cond_kwargs=added_cond_kwargs
    )
    last = torch.full((len(x0),), int(inverse_scheduler.timesteps[-1]), device=x0.device)
    noise = implied_noise(x_inv, x0.float(), last, alphas_cumprod)
    return standardise(remove_x0_component(noise, x0.float()))


def v_prediction_target(noise, x0, timesteps, alphas_cumprod):
    """v* = √ᾱ_t · ε − √(1 − ᾱ_t) · x0. Args: noise, x0 (N, C, H, W); timesteps (N,). Returns (N, C, H, W)."""
    a_t = _per_sample(alphas_cumprod.to(x0.device)[timesteps], x0)
    return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0


def regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type):
    """The model's regression target for noise `noise` in its own parameterisation (ε, v, or the velocity ε − x0)."""
    if prediction_type == FLOW_MATCH:
        return noise - x0
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
    inside = −½·β·[(e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)], the implicit reward margin r_w − r_l with
    r = −½·β·(e_θ − e_ref). β enters every loss type as ½·β (the scale of diffusers' `--beta_dpo` in its
    sigmoid loss); per `loss_type`, averaged over pairs:
      sigmoid: −log σ(inside)                          (the paper's loss)
      hinge:   max(0, 1 − inside)
      ipo:     (logits − 1/β)² = (2/β)²·(inside − ½)²  (IPO's (h − 1/(2τ))² with τ = ½·β)

    Accuracy counts inside > 0 as 1 and a tie (inside == 0) as ½.

    Args: four (B,) per-sample errors from `per_sample_mse`; beta a float; loss_type one of LOSS_TYPES.
    Returns: (loss, metrics) with loss a scalar tensor (with grad through the policy errors) and metrics a dict
    of float scalar tensors: loss, implicit_acc, reward_margin, policy_mse, reference_mse (means over all 2B rows).
    """
    logits = (reference_error_w - reference_error_l) - (policy_error_w - policy_error_l)
    inside = 0.5 * beta * logits
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inside).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - inside).mean()
    elif loss_type == "ipo":
        loss = ((logits - 1 / beta) ** 2).mean()
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


def schedule_of(inverse_scheduler, device):
    """(ᾱ (T,) on `device`, prediction type) of a DDIM inverse scheduler; (None, FLOW_MATCH) of a flow schedule."""
    if isinstance(inverse_scheduler, FlowMatchingSchedule):
        return None, FLOW_MATCH
    return inverse_scheduler.alphas_cumprod.to(device), inverse_scheduler.config.prediction_type


def sample_timesteps(inverse_scheduler, shape, generator, device):
    """Training t: uniform on {0, ..., T−1}, or for flow matching σ from the schedule's density. Returns `shape`."""
    if isinstance(inverse_scheduler, FlowMatchingSchedule):
        return inverse_scheduler.sample_sigmas(math.prod(shape), generator, device).reshape(shape)
    num_train_timesteps = inverse_scheduler.config.num_train_timesteps
    return torch.randint(0, num_train_timesteps, shape, generator=generator, device=device)


def _as_timesteps(timesteps, device):
    """Integer t as long, σ (flow matching) as float32, on `device`."""
    timesteps = timesteps.to(device)
    return timesteps.float() if timesteps.is_floating_point() else timesteps.long()


# -- The loss of one training step, from given UNets, latents and conditioning ---------------------------------


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
        eta=0.1, added_cond_kwargs=None, generator=None, fresh_noise_mix=0.9, fresh_noise=None,
        share_inverted_noise=False):  # fmt: skip
    """The noisy latents the loss is scored at and the noise they imply, for 2B rows laid out winners first.

    inverted_noise (the default): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·mix_fresh_noise(ε', ξ, fresh_noise_mix), ε' each image's
    own `inverted_noise` by `inversion_unet` (the reference; made one per pair with `share_inverted_noise`), ξ fresh
    noise shared by the pair. inversion (the paper's InPO): DDIM inversion of x0 up to t by `inversion_unet` (the
    policy) with noise `eta`, target its implied noise. forward (Diffusion-DPO): the forward formula with ξ alone.

    Args: x0 (2B, C, H, W); timesteps (2B,); fresh_noise optional (2B, C, H, W) ξ (drawn from `generator` when
    None). Returns: (latents (2B, C, H, W) float32, noise (2B, C, H, W) float32).
    """
    alphas_cumprod, prediction_type = schedule_of(inverse_scheduler, x0.device)
    if latent_source == "inversion":
        x_inv = ddim_invert(inversion_unet, x0, timesteps, encoder_hidden_states, inverse_scheduler, eta=eta,
            generator=generator, added_cond_kwargs=added_cond_kwargs)  # fmt: skip
        return x_inv, implied_noise(x_inv, x0.float(), timesteps, alphas_cumprod)
    if latent_source == "inverted_noise":
        noise = inverted_noise(inversion_unet, x0, encoder_hidden_states, inverse_scheduler, added_cond_kwargs)
        noise = share_within_pairs(noise) if share_inverted_noise else noise
        if fresh_noise_mix > 0:
            fresh = pair_shared_noise(x0, generator) if fresh_noise is None else fresh_noise
            noise = mix_fresh_noise(noise, fresh, fresh_noise_mix)
    elif latent_source == "forward":
        noise = pair_shared_noise(x0, generator) if fresh_noise is None else fresh_noise
    else:
        raise ValueError(f"latent_source must be one of {LATENT_SOURCES}, got {latent_source!r}")
    return noised_latents(x0.float(), noise, timesteps, alphas_cumprod, prediction_type), noise


def reference_errors_at(reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    """e_ref per row: the frozen reference's error at (latents, t, c), without grad. Shapes as `score_pairs`."""
    model_kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    with torch.no_grad():
        prediction = reference_unet(
            latents.to(reference_unet.dtype), timesteps, encoder_hidden_states, **model_kwargs
        ).sample
    return per_sample_mse(prediction, target)


def score_pairs(policy_unet, latents, target, timesteps, encoder_hidden_states, reference_errors, beta,
        added_cond_kwargs=None, loss_type="sigmoid", policy_dtype=torch.float32):  # fmt: skip
    """The policy's errors at (latents, t, c) against `target`, turned into the InPO loss with e_ref. Its inputs are
    cast to `policy_dtype`, that of its trainable weights: fp32 under accelerate's autocast, bf16/fp16 under
    DeepSpeed, which casts the whole module and runs no autocast.

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


def inpo_step_loss(policy_unet, reference_unet, inversion_unet, x0, encoder_hidden_states,
        inverse_scheduler, beta, latent_source="inverted_noise", eta=0.1, added_cond_kwargs=None,
        timesteps=None, generator=None, loss_type="sigmoid", fresh_noise_mix=0.9, fresh_noise=None,
        share_inverted_noise=False, policy_dtype=torch.float32):  # fmt: skip
    """Online InPO loss and metrics for B pairs: sample t, build the noisy latents, score policy against reference.

    Args: policy_unet, the trained UNet (called with grad); reference_unet, the frozen reference (without grad);
    inversion_unet, the one that inverts (the reference for the default, the policy for the paper's InPO); x0
    (2B, C, H, W) winners first; encoder_hidden_states (2B, L, D); timesteps optional (B,) per pair (drawn
    uniformly from {0, ..., T−1} when None); latent_source, eta, fresh_noise_mix, fresh_noise, share_inverted_noise
    as `source_latents`;
    policy_dtype as `score_pairs`. Returns (loss, metrics) as `score_pairs`.
    """
    alphas_cumprod, prediction_type = schedule_of(inverse_scheduler, x0.device)
    if timesteps is None:
        timesteps = sample_timesteps(inverse_scheduler, (len(x0) // 2,), generator, x0.device)
    timesteps = _as_timesteps(timesteps, x0.device).repeat(2)
    latents, noise = source_latents(x0, timesteps, latent_source, inversion_unet, encoder_hidden_states,
        inverse_scheduler, eta, added_cond_kwargs, generator, fresh_noise_mix, fresh_noise, share_inverted_noise)  # fmt: skip
    target = regression_target(noise, x0.float(), timesteps, alphas_cumprod, prediction_type)
    reference_errors = reference_errors_at(
        reference_unet, latents, target, timesteps, encoder_hidden_states, added_cond_kwargs
    )
    return score_pairs(policy_unet, latents, target, timesteps, encoder_hidden_states, reference_errors, beta,
        added_cond_kwargs, loss_type, policy_dtype)  # fmt: skip


# -- Invert once: the inversion cache, one policy forward and backward per training step -----------------------

CACHE_FORMAT_VERSION = 2
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
        "fresh_noise_mix": args.fresh_noise_mix,
        "share_inverted_noise": args.share_inverted_noise,
        "draws_per_pair": args.cache_draws_per_pair,
        "cache_dtype": args.cache_dtype,
    }
    if is_sdxl:
        fingerprint.update(vae=args.pretrained_vae_model_name_or_path, fixed_time_ids=args.fixed_time_ids)
    sd3_settings = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "without_t5")
    fingerprint.update({name: getattr(args, name) for name in sd3_settings if hasattr(args, name)})
    return json.loads(json.dumps(fingerprint))  # normalise tuples/floats as they will read back


def fingerprint_differences(stored, current):
    """Human-readable list of the settings that differ between two fingerprints."""
    keys = sorted(set(stored) | set(current))
    differ = [k for k in keys if stored.get(k) != current.get(k)]
    return [f"{k}: cache has {stored.get(k)!r}, this run has {current.get(k)!r}" for k in differ]


def read_cache_manifest(cache_dir, fingerprint):
    """The manifest of a complete cache made with `fingerprint`; a clear error for a missing, partial or stale one."""
    manifest_path = os.path.join(cache_dir, CACHE_MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        incomplete = "is incomplete (no manifest.json: the precompute did not finish)"
        state = incomplete if os.path.isdir(cache_dir) else "does not exist"
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


def seeded_noise(seeds, shape):
    """N(0, I) noise of `shape` for each seed, drawn on the CPU so that it is the same on every device.

    Args: seeds, a sequence of N ints; shape (C, H, W). Returns (N, C, H, W) float32 on the CPU.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])


def cache_rows(reference_unet, x0, encoder_hidden_states, inverse_scheduler, cache_dtype,
        draws_per_pair=1, fresh_noise_mix=0.9, added_cond_kwargs=None, generator=None,
        share_inverted_noise=False):  # fmt: skip
    """Cache entries for one batch of B pairs, in per-pair layout (B, 2, ...) with the winner at index 0.

    Each image's `inverted_noise` (K reference forwards; `share_within_pairs` with `share_inverted_noise`), and
    `draws_per_pair` draws per pair of what a step needs beside the policy: t, the seed of the pair's fresh noise
    (`seeded_noise`) and both images' e_ref at x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·mix_fresh_noise(noise, fresh) (one
    reference forward per draw), computed on the values rounded to `cache_dtype`, exactly as training reads them.

    Args: x0 (2B, C, H, W) winners first; encoder_hidden_states (2B, L, D); added_cond_kwargs (2B, ...). Returns
    tensors: x0, noise (B, 2, C, H, W); encoder_hidden_states (B, L, D); timesteps, noise_seeds (B, draws) long;
    reference_errors (B, 2, draws) float32; added_cond.<name> (B, 2, ...).
    """

    def as_stored(tensor):
        return tensor.to(CACHE_DTYPES[cache_dtype]).float()

    def per_pair(tensor):  # (2B, ...) winners first → (B, 2, ...)
        return torch.stack(tensor.chunk(2), dim=1)

    x0 = as_stored(x0)
    encoder_hidden_states = as_stored(encoder_hidden_states).to(encoder_hidden_states.dtype)
    if added_cond_kwargs:
        added_cond_kwargs = {k: as_stored(v).to(v.dtype) for k, v in added_cond_kwargs.items()}
    num_pairs = len(x0) // 2
    alphas_cumprod, prediction_type = schedule_of(inverse_scheduler, x0.device)
    noise = inverted_noise(reference_unet, x0, encoder_hidden_states, inverse_scheduler, added_cond_kwargs)
    noise = as_stored(share_within_pairs(noise) if share_inverted_noise else noise)
    draw_shape = (num_pairs, draws_per_pair)
    timesteps = sample_timesteps(inverse_scheduler, draw_shape, generator, x0.device)
    timesteps = as_stored(timesteps) if timesteps.is_floating_point() else timesteps  # σ is stored in cache_dtype
    seeds = torch.randint(0, 2**62, draw_shape, generator=generator, device=x0.device)
    errors = []
    for draw in range(draws_per_pair):
        draw_timesteps = timesteps[:, draw].repeat(2)
        mixed = noise
        if fresh_noise_mix > 0:
            fresh = seeded_noise(seeds[:, draw].tolist(), x0.shape[1:]).to(x0.device).repeat(2, 1, 1, 1)
            mixed = mix_fresh_noise(noise, fresh, fresh_noise_mix)
        latents = noised_latents(x0, mixed, draw_timesteps, alphas_cumprod, prediction_type)
        target = regression_target(mixed, x0, draw_timesteps, alphas_cumprod, prediction_type)
        errors.append(
            reference_errors_at(
                reference_unet, latents, target, draw_timesteps, encoder_hidden_states, added_cond_kwargs
            )
        )
    rows = {
        "x0": per_pair(x0),
        "noise": per_pair(noise),
        "encoder_hidden_states": encoder_hidden_states[:num_pairs],
        "timesteps": timesteps,
        "noise_seeds": seeds,
        "reference_errors": per_pair(torch.stack(errors, dim=-1)),
    }
    for name, value in (added_cond_kwargs or {}).items():
        rows[f"added_cond.{name}"] = per_pair(value)
    return rows


def write_shard(cache_dir, index, columns, cache_dtype):
    """Write shard `index` from lists of per-batch tensors, floats (but e_ref) in `cache_dtype`: to a temporary
    file, then renamed, so a killed precompute never leaves a half-written shard. Returns its size in bytes."""
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


def write_cache_manifest(cache_dir, fingerprint, num_shards, seconds, log=print):
    """Write manifest.json once every shard is there: what marks a cache complete."""
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
    """Pairs read back from a cache, each with its training draw for the current epoch: epoch e reads draw
    e mod D of the cache's D draws per pair (the pair's fresh noise is regenerated from its seed on the CPU)."""

    def __init__(self, cache_dir, manifest):
        self.fresh_noise_mix = manifest["fingerprint"]["fresh_noise_mix"]
        self.draws_per_pair = manifest["fingerprint"]["draws_per_pair"]
        self.epoch = 0
        self.shards = [shard_file(cache_dir, i) for i in range(manifest["num_shards"])]
        self.index = []
        for shard, path in enumerate(self.shards):
            with safe_open(path, framework="pt") as f:
                self.index += [(shard, row) for row in range(f.get_slice("x0").get_shape()[0])]
                self.keys = list(f.keys())
        self.handles = {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def _read(self, shard, name, row):
        if shard not in self.handles:  # opened lazily so each DataLoader worker gets its own handles
            self.handles[shard] = safe_open(self.shards[shard], framework="pt")
        return self.handles[shard].get_slice(name)[row]

    def __getitem__(self, index):
        shard, row = self.index[index]
        draw = self.epoch % self.draws_per_pair
        example = {name: self._read(shard, name, row) for name in ("x0", "noise", "encoder_hidden_states")}
        example["timestep"] = self._read(shard, "timesteps", row)[draw]
        example["reference_errors"] = self._read(shard, "reference_errors", row)[:, draw]
        if self.fresh_noise_mix > 0:
            seed = self._read(shard, "noise_seeds", row)[draw]
            example["fresh_noise"] = seeded_noise([seed], example["x0"].shape[1:])[0]
        for key in self.keys:
            if key.startswith("added_cond."):
                example[key] = self._read(shard, key, row)
        return example


def collate_cached(examples):
    """Batch cached pairs as 2B rows, winners first (the layout of `collate_pairs`): x0, noise, fresh_noise (one
    per pair, the same for both rows; None without the fresh-noise mix), timesteps (B,), reference_errors,
    encoder_hidden_states, added_cond_kwargs (None for SD)."""

    def winners_then_losers(key):
        stacked = torch.stack([example[key] for example in examples])  # (B, 2, ...)
        return torch.cat([stacked[:, 0], stacked[:, 1]])

    hidden = torch.stack([example["encoder_hidden_states"] for example in examples])
    fresh = torch.stack([example["fresh_noise"] for example in examples]) if "fresh_noise" in examples[0] else None
    return {
        "x0": winners_then_losers("x0"),
        "noise": winners_then_losers("noise"),
        "fresh_noise": None if fresh is None else torch.cat([fresh, fresh]),
        "timesteps": torch.stack([example["timestep"] for example in examples]),
        "reference_errors": winners_then_losers("reference_errors"),
        "encoder_hidden_states": torch.cat([hidden, hidden]),
        "added_cond_kwargs": {
            key[len("added_cond.") :]: winners_then_losers(key) for key in examples[0] if key.startswith("added_cond.")
        }
        or None,
    }


def cached_step_loss(policy_unet, x0, noise, timesteps, encoder_hidden_states, reference_errors,
        alphas_cumprod, prediction_type, beta, added_cond_kwargs=None, loss_type="sigmoid",
        fresh_noise_mix=0.9, fresh_noise=None, policy_dtype=torch.float32):  # fmt: skip
    """InPO loss and metrics for B cached pairs, the policy's forward only: online training's `inpo_step_loss` on
    the cached draw, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·mix_fresh_noise(noise, fresh_noise), against the stored e_ref.

    Args: x0, noise, fresh_noise (2B, C, H, W) winners first (fresh_noise None without the mix); timesteps (B,);
    encoder_hidden_states (2B, L, D); reference_errors (2B,). Returns (loss, metrics) as `score_pairs`.
    """
    alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.to(x0.device)
    timesteps = _as_timesteps(timesteps, x0.device).repeat(2)
    if fresh_noise_mix > 0:
        noise = mix_fresh_noise(noise, fresh_noise, fresh_noise_mix)
    latents = noised_latents(x0, noise, timesteps, alphas_cumprod, prediction_type)
    target = regression_target(noise, x0, timesteps, alphas_cumprod, prediction_type)
    return score_pairs(policy_unet, latents, target, timesteps, encoder_hidden_states, reference_errors, beta,
        added_cond_kwargs, loss_type, policy_dtype)  # fmt: skip
