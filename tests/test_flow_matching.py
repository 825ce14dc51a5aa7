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
"""The flow-matching (SD3) functions of inpo_utils against closed forms."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import inpo_utils


SD3_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0).config


class VelocityField:
    """A model with a known velocity field v(x, σ), called as inpo_utils calls a model; records its σ."""

    dtype = torch.float32

    def __init__(self, velocity):
        self.velocity, self.sigmas = velocity, []

    def __call__(self, latents, sigmas, encoder_hidden_states, added_cond_kwargs=None):
        self.sigmas.append(sigmas.clone())
        return types.SimpleNamespace(sample=self.velocity(latents, sigmas.view(-1, 1, 1, 1)))


def test_the_inversion_grid_is_the_samplers_schedule_reversed_from_zero_to_one():
    schedule = inpo_utils.FlowMatchingSchedule(SD3_SCHEDULER, 5)
    sampler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    sampler.set_timesteps(5)
    torch.testing.assert_close(schedule.sigmas, sampler.sigmas.float().flip(0))
    assert schedule.sigmas[0] == 0 and schedule.sigmas[-1] == pytest.approx(1.0) and len(schedule.sigmas) == 6
    assert (schedule.sigmas.diff() > 0).all()


def test_euler_inversion_of_known_velocity_fields():
    schedule = inpo_utils.FlowMatchingSchedule(SD3_SCHEDULER, 4)
    sigmas = schedule.sigmas.double()
    x0 = torch.randn(3, 4, 8, 8)
    # Constant velocity c: x(1) = x0 + c exactly, whatever the grid.
    constant = torch.randn(1, 4, 8, 8)
    model = VelocityField(lambda x, s: constant.expand_as(x))
    inverted = inpo_utils.flow_match_invert(model, x0, schedule.sigmas, None)
    torch.testing.assert_close(inverted, x0 + constant * float(sigmas[-1]), rtol=1e-5, atol=1e-5)
    # v = σ·x, read at the level being reached: each step multiplies by 1 + (σ_{k+1} − σ_k)·σ_{k+1}.
    model = VelocityField(lambda x, s: s * x)
    inverted = inpo_utils.flow_match_invert(model, x0, schedule.sigmas, None)
    factor = torch.prod(1 + sigmas.diff() * sigmas[1:]).item()
    torch.testing.assert_close(inverted, x0 * factor, rtol=1e-5, atol=1e-5)
    assert [float(s[0]) for s in model.sigmas] == pytest.approx(schedule.sigmas[1:].tolist())  # never σ = 0


def test_inverted_noise_of_the_straight_path_is_its_noise_without_the_x0_part():
    # The velocity field of one straight path x_σ = (1 − σ)·x0 + σ·ε is ε − x0 everywhere: inversion lands on ε.
    schedule = inpo_utils.FlowMatchingSchedule(SD3_SCHEDULER, 3)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    model = VelocityField(lambda x, s: noise - x0)
    expected = inpo_utils.standardise(inpo_utils.remove_x0_component(noise, x0))
    torch.testing.assert_close(inpo_utils.inverted_noise(model, x0, None, schedule), expected, rtol=1e-4, atol=1e-4)


def test_noising_and_target_of_rectified_flow():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.25, 1.0])
    noised = inpo_utils.noised_latents(x0, noise, sigmas, None, inpo_utils.FLOW_MATCH)
    torch.testing.assert_close(noised[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(noised[1], noise[1])
    target = inpo_utils.regression_target(noise, x0, sigmas, None, inpo_utils.FLOW_MATCH)
    torch.testing.assert_close(target, noise - x0)
    # Euler from x_σ along the target velocity reaches x0 at σ = 0: the sampler's direction.
    torch.testing.assert_close(noised - sigmas.view(-1, 1, 1, 1) * target, x0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting_scheme", ["logit_normal", "mode", "none"])
def test_training_sigmas_are_the_shifted_schedule_at_the_drawn_index(weighting_scheme):
    schedule = inpo_utils.FlowMatchingSchedule(SD3_SCHEDULER, 5, weighting_scheme=weighting_scheme)
    first = schedule.sample_sigmas(4096, torch.Generator().manual_seed(0))
    again = schedule.sample_sigmas(4096, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, again)
    training = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER).sigmas
    assert torch.isin(first, training.float()).all() and 0 < first.min() and first.max() <= 1
    if weighting_scheme == "none":  # u uniform: the index is uniform, so half the draws sit above the middle σ
        assert (first > training[500]).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_inpo_step_loss_on_a_flow_schedule_scores_at_the_given_sigmas():
    schedule = inpo_utils.FlowMatchingSchedule(SD3_SCHEDULER, 3)
    x0 = torch.randn(4, 4, 8, 8)  # 2 pairs
    fresh = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    sigmas = torch.tensor([0.3, 0.8])
    reference = VelocityField(lambda x, s: torch.zeros_like(x))
    policy = VelocityField(lambda x, s: 0.1 * x)
    loss, metrics = inpo_utils.inpo_step_loss(
        policy, reference, reference, x0, torch.zeros(4, 1, 8), schedule, 100.0, timesteps=sigmas, fresh_noise_mix=1.0,
        fresh_noise=fresh, latent_source="inverted_noise",
    )  # fmt: skip
    # With λ = 1 the noise is the fresh noise alone: errors in closed form.
    s = sigmas.repeat(2).view(-1, 1, 1, 1)
    x_sigma, target = (1 - s) * x0 + s * fresh, fresh - x0
    policy_errors = (0.1 * x_sigma - target).pow(2).mean(dim=(1, 2, 3))
    reference_errors = target.pow(2).mean(dim=(1, 2, 3))
    inside = 0.5 * 100.0 * ((reference_errors[:2] - reference_errors[2:]) - (policy_errors[:2] - policy_errors[2:]))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(inside).mean().item(), rel=1e-5)
    assert metrics["timestep"].item() == pytest.approx(0.55)
