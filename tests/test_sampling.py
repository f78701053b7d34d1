"""The schedule and samplers, with mock denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS
from wuerstchen.sampling import add_noise, alpha_cumprod, ddpm_step, randn, sample, timesteps


def test_cosine_schedule():
    assert float(alpha_cumprod(0.0)) == pytest.approx(0.9999)  # clamped
    assert float(alpha_cumprod(1.0)) == pytest.approx(1e-4)
    s = 0.008
    expected = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert float(alpha_cumprod(0.5)) == pytest.approx(expected, rel=1e-6)
    values = alpha_cumprod(torch.linspace(0, 1, 50))
    assert torch.all(values[1:] <= values[:-1])


def test_default_stage_c_timesteps():
    # diffusers' definition: linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:] = 30 times, 29 steps.
    t = DEFAULT_STAGE_C_TIMESTEPS
    assert len(t) == 30 and t[0] == 1.0 and t[-1] == 0.0
    assert t[19] == pytest.approx(2 / 3) and t[20] == pytest.approx(0.6)
    assert all(a > b for a, b in zip(t, t[1:], strict=False))
    assert timesteps(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError):
        timesteps(0)


def test_ddpm_step_matches_the_reference_scheduler():
    from diffusers import DDPMWuerstchenScheduler

    sched = DDPMWuerstchenScheduler()
    times = [1.0, 0.7, 0.3, 0.0]
    sched.set_timesteps(timesteps=times)
    x, eps = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    for t, t_prev in zip(times, times[1:], strict=False):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        want = sched.step(eps, torch.full((2,), t), x, generator=g1).prev_sample
        got = ddpm_step(x, eps, t, t_prev, randn(x.shape, g2, "cpu", torch.float32))
        assert torch.equal(got, want)


def _oracle(x0: torch.Tensor):
    """The exact noise estimate for data that is the single point x0."""

    def denoise(x, r):
        ab = alpha_cumprod(r).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return denoise


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_the_data_with_an_oracle(sampler):
    x0 = torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(_oracle(x0), x, DEFAULT_STAGE_C_TIMESTEPS, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert (out - x0).abs().max() < 0.02


def test_ddim_is_deterministic_and_ddpm_draws_noise_every_step():
    x = torch.randn(1, 2, 3, 3)
    denoise = lambda x, r: 0.5 * x  # noqa: E731
    a = sample(denoise, x, timesteps(5), sampler="ddim")
    assert torch.equal(a, sample(denoise, x, timesteps(5), sampler="ddim"))
    g = torch.Generator().manual_seed(3)
    sample(denoise, x, timesteps(5), sampler="ddpm", generator=g)
    reference = torch.Generator().manual_seed(3)
    for _ in range(5):  # the reference draws noise at every step, the last one too
        torch.randn(1, 2, 3, 3, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_sample_does_not_modify_its_input():
    x = torch.randn(1, 2, 3, 3)
    before = x.clone()
    sample(lambda x, r: x, x, timesteps(3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


def test_sample_rejects_bad_schedules():
    with pytest.raises(ValueError, match="decreasing"):
        sample(lambda x, r: x, torch.zeros(1, 1, 1, 1), [0.0, 1.0])
    with pytest.raises(ValueError, match="sampler"):
        sample(lambda x, r: x, torch.zeros(1, 1, 1, 1), [1.0, 0.0], sampler="euler")


def test_randn_with_a_list_of_generators_draws_per_sample():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    batch = randn((2, 3, 2, 2), gens, "cpu", torch.float32)
    alone = randn((1, 3, 2, 2), [torch.Generator().manual_seed(6)], "cpu", torch.float32)
    assert torch.equal(batch[1:], alone)


def test_add_noise():
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    out = add_noise(x0, noise, t)
    ab = alpha_cumprod(t).view(-1, 1, 1, 1)
    assert torch.allclose(out, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_shifted_timesteps_put_the_steps_at_the_shifted_noise_levels():
    from wuerstchen.sampling import shifted_timesteps

    assert shifted_timesteps(7, 1.0) == timesteps(7)
    times = shifted_timesteps(10, 2.0)
    assert times[0] == 1.0 and times[-1] == 0.0 and all(a > b for a, b in zip(times, times[1:], strict=False))
    # Inner steps: ᾱ at our time = sigmoid(logit ᾱ(even time) − 2 log 2), the official GDF shift.
    even = torch.tensor(timesteps(10)[1:-1])
    ab = alpha_cumprod(even).double()
    want = torch.sigmoid(torch.log(ab / (1 - ab)) - 2 * math.log(2.0))
    got = alpha_cumprod(torch.tensor(times[1:-1])).double()
    assert (got - want).abs().max() <= 1e-6  # float32 ᾱ of the float64 times: rounding ~1e-7
    assert all(t > e for t, e in zip(times[1:-1], even.tolist(), strict=True))  # later (noisier) at each step
    with pytest.raises(ValueError, match="shift"):
        shifted_timesteps(4, 0.0)
