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
"""Unit tests of the math in inpo_utils.py against closed forms and diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

import inpo_utils
from inpo_utils import (
    ddim_inverse_step,
    ddim_invert,
    forward_noised,
    implied_noise,
    inpo_loss,
    inversion_noise_std,
    inverted_noise,
    make_inverse_scheduler,
    mix_fresh_noise,
    per_sample_mse,
    remove_x0_component,
    source_latents,
    standardise,
    v_prediction_target,
)


SD15_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


class ConstantNoiseUNet(torch.nn.Module):
    """Predicts the same ε (1, C, H, W) for every input: DDIM then keeps x̂0 fixed, so inversion has a closed form."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.calls = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.calls.append(timestep.clone())
        return type("Out", (), {"sample": self.eps.expand_as(sample)})()


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def test_grid_follows_model_config():
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    assert scheduler.timesteps.tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


def test_unsupported_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        make_inverse_scheduler(DDIMScheduler(prediction_type="sample").config, 10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inverse_step_then_reverse_step_is_identity(prediction_type):
    torch.manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a_from, a_to = torch.tensor([0.9, 0.5, 0.99]), torch.tensor([0.3, 0.2, 0.7])
    moved = ddim_inverse_step(x, out, a_from, a_to, "epsilon")
    back = ddim_inverse_step(moved, out, a_to, a_from, "epsilon")
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    if prediction_type == "v_prediction":
        # v = √ᾱ ε − √(1−ᾱ) x0 describes the same step as its ε.
        a = a_from.view(-1, 1, 1, 1)
        x0_hat = (x - (1 - a).sqrt() * out) / a.sqrt()
        v = a.sqrt() * out - (1 - a).sqrt() * x0_hat
        torch.testing.assert_close(ddim_inverse_step(x, v, a_from, a_to, "v_prediction"), moved, atol=1e-5, rtol=1e-5)


def test_noise_std_matches_ddim_posterior_variance():
    scheduler = DDIMScheduler(**SD15_SCHEDULE)
    landed = torch.tensor([1, 101, 501, 801])
    expected = torch.stack([scheduler._get_variance(int(t) + 100, int(t)).sqrt() for t in landed])
    torch.testing.assert_close(inversion_noise_std(scheduler.alphas_cumprod, landed, 100), expected)
    # Past the end of the schedule τ+Δ is clamped to T−1.
    last = inversion_noise_std(scheduler.alphas_cumprod, torch.tensor([901]), 100)
    torch.testing.assert_close(last, scheduler._get_variance(999, 901).sqrt().view(1))


def test_constant_model_inversion_closed_form():
    """With ε̂ ≡ c, every DDIM step keeps x̂0 = (x0 − √(1−ᾱ_init)c)/√ᾱ_init, so x_inv = √ᾱ_end x̂0 + √(1−ᾱ_end) c."""
    torch.manual_seed(0)
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    x0, c = torch.randn(4, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([0, 150, 901, 999])
    out = ddim_invert(ConstantNoiseUNet(c), x0, t, torch.zeros(4, 2, 16), scheduler)
    acp = scheduler.alphas_cumprod
    a_init = scheduler.initial_alpha_cumprod
    x0_hat = (x0 - (1 - a_init).sqrt() * c) / a_init.sqrt()
    # The last grid point below t: none for t=0, 101 for 150, 801 for 901 (strictly below), 901 for 999.
    a_end = torch.stack([a_init, acp[101], acp[801], acp[901]])
    a_end = a_end.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, a_end.sqrt() * x0_hat + (1 - a_end).sqrt() * c, atol=1e-5, rtol=1e-5)


def test_inversion_evaluates_the_unet_at_each_grid_point_below_t_only():
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    unet = ConstantNoiseUNet(torch.randn(1, 4, 8, 8))
    ddim_invert(unet, torch.randn(3, 4, 8, 8), torch.tensor([350, 120, 1000]), torch.zeros(3, 2, 16), scheduler)
    # Rows needing a grid point are batched together: [1, 101] for all three, 201/301 for two, the rest for one.
    assert [call.tolist() for call in unet.calls] == [[1] * 3, [101] * 3, [201] * 2, [301] * 2] + [
        [point] for point in (401, 501, 601, 701, 801, 901)
    ]


def test_grid_matches_loop_over_diffusers_inverse_scheduler():
    unet = tiny_unet()
    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8)
    text = torch.randn(3, 5, 16)
    t = torch.tensor([999, 420, 50])
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    ours = ddim_invert(unet, x0, t, text, scheduler)

    reference = DDIMInverseScheduler.from_config(DDIMScheduler(**SD15_SCHEDULE).config)
    reference.set_timesteps(10)
    for i in range(3):
        x = x0[i : i + 1]
        with torch.no_grad():
            for tau in reference.timesteps:
                if tau < t[i]:
                    eps = unet(x, tau, text[i : i + 1]).sample
                    x = reference.step(eps, tau, x).prev_sample
        torch.testing.assert_close(ours[i : i + 1], x, atol=1e-5, rtol=1e-5)


def _round_trip_error(unet, x0, text, steps):
    """Invert x0 halfway (eta 0, grid endpoint), DDIM-sample back on the same grid, return ‖x − x0‖/‖x0‖."""
    config = DDIMScheduler(**SD15_SCHEDULE).config
    inverse = make_inverse_scheduler(config, steps)
    top = int(inverse.timesteps[steps // 2])
    x = ddim_invert(unet, x0, torch.full((len(x0),), top + 1), text, inverse)
    travelled = (x - x0).norm() / x0.norm()
    sampler = DDIMScheduler.from_config(config)
    sampler.set_timesteps(steps)
    with torch.no_grad():
        for tau in sampler.timesteps:
            if tau <= top:
                x = sampler.step(unet(x, tau, text).sample, tau, x).prev_sample
    return ((x - x0).norm() / x0.norm()).item(), travelled.item()


def test_inversion_then_ddim_sampling_returns_to_x0():
    """Deterministic inversion then DDIM sampling recovers x0, with first-order convergence in the grid size."""
    unet = tiny_unet()
    torch.manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8) * 0.5
    text = torch.randn(2, 5, 16)
    coarse, _ = _round_trip_error(unet, x0, text, steps=50)  # measured 0.043
    fine, travelled = _round_trip_error(unet, x0, text, steps=250)  # measured 0.0087
    assert fine < 0.01
    assert fine < coarse / 4
    assert travelled > 0.5  # the latent did move far from x0 (measured 0.81)


def test_eta_adds_scaled_posterior_noise():
    torch.manual_seed(0)
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    x0, c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([50])  # exactly one grid step, landing on τ=1
    unet = ConstantNoiseUNet(c)
    clean = ddim_invert(unet, x0, t, torch.zeros(1, 2, 16), scheduler, eta=0.0)
    noisy = ddim_invert(
        unet, x0, t, torch.zeros(1, 2, 16), scheduler, eta=0.1, generator=torch.Generator().manual_seed(7)
    )
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sigma = inversion_noise_std(scheduler.alphas_cumprod, torch.tensor([1]), 100)
    torch.testing.assert_close(noisy - clean, 0.1 * sigma * z, atol=1e-6, rtol=1e-5)


def test_implied_noise_inverts_forward_process():
    torch.manual_seed(0)
    acp = DDIMScheduler(**SD15_SCHEDULE).alphas_cumprod
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = acp[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(implied_noise(x_t, x0, t, acp), eps, atol=1e-4, rtol=1e-4)
    v = v_prediction_target(eps, x0, t, acp)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # Hand value: ᾱ = acp[500], x0 = 1, x_t = 2 → ε* = (2 − √ᾱ)/√(1−ᾱ).
    one = torch.ones(1, 1, 1, 1)
    expected = (2 - math.sqrt(acp[500])) / math.sqrt(1 - acp[500])
    assert implied_noise(2 * one, one, torch.tensor([500]), acp).item() == pytest.approx(expected, rel=1e-6)


def test_per_sample_mse():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(per_sample_mse(pred, target), torch.tensor([1.0, 1.0]))


def test_inpo_loss_hand_computed():
    pw, pl = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    rw, rl = torch.tensor([0.12, 0.20]), torch.tensor([0.29, 0.10])
    beta = 100.0
    loss, metrics = inpo_loss(pw, pl, rw, rl, beta)
    # pair 0: inside = −50·[(0.10−0.12) − (0.30−0.29)] = −50·(−0.03) = 1.5; pair 1: 0 (a tie).
    inside = torch.tensor([1.5, 0.0])
    expected_loss = (math.log1p(math.exp(-1.5)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["implicit_acc"].item() == pytest.approx(0.75)  # 1 + ½ for the tie
    assert metrics["reward_margin"].item() == pytest.approx(inside.mean().item(), rel=1e-5)
    assert metrics["policy_mse"].item() == pytest.approx(0.175)
    assert metrics["reference_mse"].item() == pytest.approx(0.1775)


def test_inpo_loss_beta_scaling_and_sign():
    rw, rl = torch.tensor([0.2]), torch.tensor([0.2])
    pw = torch.tensor([0.2], requires_grad=True)
    loss, _ = inpo_loss(pw, torch.tensor([0.2]), rw, rl, beta=10.0)
    loss.backward()
    # ∂L/∂e_θ,w = ½β·σ(−inside) = 5·½ at inside = 0: lowering the winner's error lowers the loss.
    assert pw.grad.item() == pytest.approx(2.5)
    lower, _ = inpo_loss(torch.tensor([0.19]), torch.tensor([0.2]), rw, rl, beta=10.0)
    assert lower < loss
    # β multiplies the inside term: the same error gap at 10× β is the same loss as a 10× gap.
    a, _ = inpo_loss(torch.tensor([0.19]), torch.tensor([0.2]), rw, rl, beta=100.0)
    b, _ = inpo_loss(torch.tensor([0.10]), torch.tensor([0.2]), rw, rl, beta=10.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    assert inpo_utils.SUPPORTED_PREDICTION_TYPES == ("epsilon", "v_prediction")


def test_loss_types_hand_computed():
    # pair 0: logits = (0.6−0.6) − (0.5−0.7) = 0.2; pair 1: logits = (0.6−0.62) − (0.6−0.6) = −0.02.
    pw = torch.tensor([0.5, 0.6], requires_grad=True)
    pl, rw, rl = torch.tensor([0.7, 0.6]), torch.tensor([0.6, 0.6]), torch.tensor([0.6, 0.62])
    beta = 10.0
    # sigmoid (the paper, ½·β): inside = 5·logits = 1.0, −0.1.
    sigmoid, metrics = inpo_loss(pw, pl, rw, rl, beta, loss_type="sigmoid")
    assert sigmoid.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.1))) / 2, rel=1e-5)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)
    assert metrics["reward_margin"].item() == pytest.approx((1.0 - 0.1) / 2, rel=1e-5)
    # hinge, ½·β as everywhere; at β = 20: max(0, 1 − 2.0) = 0, max(0, 1 + 0.2) = 1.2.
    hinge, hinge_metrics = inpo_loss(pw, pl, rw, rl, 20.0, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.6, rel=1e-5)
    assert hinge_metrics["implicit_acc"] == metrics["implicit_acc"]
    hinge.backward()
    # Only pair 1 is inside the margin: ∂/∂e_θ,w = ½·β / B there, 0 for pair 0.
    assert pw.grad.tolist() == pytest.approx([0.0, 5.0])
    # ipo, τ = ½·β: (logits − 1/β)² = (0.2 − 0.1)² = 0.01, (−0.02 − 0.1)² = 0.0144.
    ipo, _ = inpo_loss(pw, pl, rw, rl, beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((0.01 + 0.0144) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="Unknown loss_type 'kto'"):
        inpo_loss(pw, pl, rw, rl, beta, loss_type="kto")


def test_remove_x0_component_is_orthogonal_projection():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5)
    orthogonal = torch.randn(3, 4, 5, 5)
    orthogonal -= (orthogonal * x0).sum(dim=(1, 2, 3), keepdim=True) / x0.pow(2).sum(dim=(1, 2, 3), keepdim=True) * x0
    coefficients = torch.tensor([0.5, -2.0, 0.0]).view(3, 1, 1, 1)
    # ε = orthogonal part + c·x0 → the orthogonal part, whatever c.
    torch.testing.assert_close(remove_x0_component(orthogonal + coefficients * x0, x0), orthogonal, atol=1e-5, rtol=0)
    assert remove_x0_component(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).eq(1).all()  # x0 = 0: unchanged


def test_standardise_gives_zero_mean_unit_std_per_sample():
    noise = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 30.0, 30.0]]).view(2, 1, 2, 2)
    out = standardise(noise)
    # Sample 0: mean 2.5, unbiased std √(5/3); sample 1: mean 20, std √(400/3).
    torch.testing.assert_close(out[0].flatten(), (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3))
    torch.testing.assert_close(out[1].flatten(), torch.tensor([-10.0, -10.0, 10.0, 10.0]) / math.sqrt(400 / 3))


def test_mix_fresh_noise_closed_form():
    noise, fresh = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    torch.testing.assert_close(
        mix_fresh_noise(noise, fresh, 0.25), torch.full((1, 1, 2, 2), math.sqrt(0.75) * 2 - 0.5)
    )
    assert mix_fresh_noise(noise, fresh, 0.0).eq(noise).all() and mix_fresh_noise(noise, fresh, 1.0).eq(fresh).all()


def test_inverted_noise_closed_form():
    # A constant-ε model keeps x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ fixed along the inversion; starting from x0 (initial
    # ᾱ = ᾱ_0 with set_alpha_to_one=False) x̂0 = (x0 − √(1−ᾱ_0)·ε)/√ᾱ_0, and at τ_K the latent is
    # √ᾱ_τ·x̂0 + √(1−ᾱ_τ)·ε, so the implied noise is ε + √ᾱ_τ·(x̂0 − x0)/√(1−ᾱ_τ), then projected and standardised.
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(1, 4, 4, 4)
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    alphas = scheduler.alphas_cumprod
    a0, a_last = scheduler.initial_alpha_cumprod, alphas[scheduler.timesteps[-1]]
    x0_hat = (x0 - (1 - a0).sqrt() * eps) / a0.sqrt()
    expected = eps + a_last.sqrt() * (x0_hat - x0) / (1 - a_last).sqrt()
    expected = standardise(remove_x0_component(expected, x0))
    out = inverted_noise(ConstantNoiseUNet(eps), x0, torch.zeros(2, 3, 16), scheduler)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_inverted_noise_source_forward_noises_with_each_images_own_noise():
    torch.manual_seed(2)
    x0, eps = torch.randn(4, 4, 4, 4), torch.randn(1, 4, 4, 4)
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    unet, hidden, timesteps = ConstantNoiseUNet(eps), torch.zeros(4, 3, 16), torch.tensor([5, 500, 5, 500])
    args = (x0, timesteps, "inverted_noise", unet, hidden, scheduler)
    latents, noise = source_latents(*args, fresh_noise_mix=0.0)
    torch.testing.assert_close(noise, inverted_noise(unet, x0, hidden, scheduler))
    torch.testing.assert_close(latents, forward_noised(x0, noise, timesteps, scheduler.alphas_cumprod))
    mixed_latents, mixed = source_latents(*args, generator=torch.Generator().manual_seed(0), fresh_noise_mix=0.5)
    fresh = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    torch.testing.assert_close(mixed, mix_fresh_noise(noise, fresh, 0.5))  # one fresh draw shared by each pair
    torch.testing.assert_close(mixed_latents, forward_noised(x0, mixed, timesteps, scheduler.alphas_cumprod))


def test_forward_source_is_diffusion_dpo_with_pair_shared_noise():
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    x0, timesteps = torch.randn(4, 4, 4, 4), torch.tensor([5, 500, 5, 500])
    latents, noise = source_latents(
        x0, timesteps, "forward", None, None, scheduler, generator=torch.Generator().manual_seed(0)
    )
    fresh = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    torch.testing.assert_close(noise, fresh)
    torch.testing.assert_close(latents, forward_noised(x0, fresh, timesteps, scheduler.alphas_cumprod))


def test_scheduler_tensors_are_moved_once_and_the_grid_stays_on_the_host():
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10, device="meta")
    assert scheduler.alphas_cumprod.device.type == "meta" and scheduler.initial_alpha_cumprod.device.type == "meta"
    assert scheduler.timesteps.device.type == "cpu"


def test_share_within_pairs_gives_both_images_the_standardised_mean_noise():
    torch.manual_seed(4)
    noise = torch.randn(4, 4, 4, 4)  # pairs (0, 2) and (1, 3)
    shared = inpo_utils.share_within_pairs(noise)
    torch.testing.assert_close(shared[:2], shared[2:])
    torch.testing.assert_close(shared[0], standardise((noise[0:1] + noise[2:3]) / math.sqrt(2))[0])
    x0, timesteps = torch.randn(4, 4, 4, 4), torch.tensor([5, 500, 5, 500])
    scheduler = make_inverse_scheduler(DDIMScheduler(**SD15_SCHEDULE).config, 10)
    unet, hidden = ConstantNoiseUNet(torch.randn(1, 4, 4, 4)), torch.zeros(4, 3, 16)
    _, per_image = source_latents(x0, timesteps, "inverted_noise", unet, hidden, scheduler, fresh_noise_mix=0.0)
    _, paired = source_latents(
        x0, timesteps, "inverted_noise", unet, hidden, scheduler, fresh_noise_mix=0.0, share_inverted_noise=True
    )
    torch.testing.assert_close(paired, inpo_utils.share_within_pairs(per_image))
