import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ernielab.image.flow_matching import (
    add_noise,
    flow_matching_loss,
    sample_training_sigmas,
    shift_sigmas,
    velocity_target,
)
from ernielab.image.samplers import cfg_denoiser, euler_sample, sigma_schedule


@pytest.mark.parametrize("steps,shift", [(50, 4.0), (8, 4.0), (20, 1.0), (4, 3.0)])
def test_schedule_matches_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())  # as ErnieImagePipeline does
    torch.testing.assert_close(sigma_schedule(steps, shift), sched.sigmas.float(), rtol=1e-6, atol=1e-6)


def test_euler_matches_diffusers_scheduler_loop():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, generator=g) * 0.3

    def velocity(x, sigma):  # any smooth, x- and sigma-dependent field
        return torch.tanh(x @ W) * (1 + sigma.view(-1, 1))

    x0 = torch.randn(3, 4, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=4.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 11)[:-1].numpy())
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(velocity(x, (t / 1000).expand(3)), t, x).prev_sample
    ours = euler_sample(velocity, x0.clone(), sigma_schedule(10, 4.0))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_euler_recovers_data_under_exact_velocity():
    """For a single data point the true velocity is (x - x0)/sigma; Euler then lands exactly on x0."""
    target = torch.tensor([[0.5, -1.0, 2.0]])
    noise = torch.randn(1, 3)
    out = euler_sample(lambda x, s: (x - target) / s.view(-1, 1), noise, sigma_schedule(7, 2.0))
    torch.testing.assert_close(out, target)


def test_noise_and_target():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = torch.tensor([0.0, 1.0])
    xt = add_noise(x0, noise, s)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    assert flow_matching_loss(velocity_target(x0, noise), x0, noise).abs().max() == 0
    weight = torch.zeros(2, 1, 4, 4)
    weight[..., :2, :] = 1
    loss = flow_matching_loss(torch.zeros_like(x0), x0, noise, weight)
    manual = ((noise - x0) ** 2 * weight).flatten(1).mean(1)
    torch.testing.assert_close(loss, manual)


def test_training_sigmas():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal"):
        s = sample_training_sigmas(4096, g, mode)
        assert 0 <= s.min() and s.max() <= 1 and abs(s.mean() - 0.5) < 0.03
    shifted = sample_training_sigmas(4096, torch.Generator().manual_seed(0), "uniform", shift=3.0)
    assert shifted.mean() > 0.6  # shift > 1 moves mass to high noise
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 5.0).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        sample_training_sigmas(2, g, "cosine")


class Affine(torch.nn.Module):
    """Velocity depends on text mean, so cond and uncond differ."""

    def forward(self, x, t, text, lens):
        mask = (torch.arange(text.shape[1])[None] < lens[:, None]).float()
        m = (text.mean(-1) * mask).sum(1) / mask.sum(1)
        return x * 0.1 + m.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_cfg_is_batched_guidance():
    model = Affine()
    cond = (torch.randn(2, 5, 8), torch.tensor([5, 2]))
    uncond = (torch.randn(2, 3, 8), torch.tensor([2, 2]))
    x, s = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.7])
    v_c = model(x, s * 1000, *cond)
    v_u = model(x, s * 1000, *uncond)
    torch.testing.assert_close(cfg_denoiser(model, cond, uncond, 4.0)(x, s), v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(cfg_denoiser(model, cond, uncond, 1.0)(x, s), v_c)
