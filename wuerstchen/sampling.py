"""The continuous-time cosine schedule, forward noising and the samplers.

Time t runs from 1 (pure noise) to 0 (data); the networks see r = t. Schedules are plain lists of
floats, so the sampling loop computes its coefficients on the host and never waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

# The official v2 prior schedule: 30 times (29 steps), 20 over the noisy first third (diffusers
# exported it under this name; `from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS` replaces that).
DEFAULT_STAGE_C_TIMESTEPS: list[float] = [
    float(t) for t in list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]
]

Generator = torch.Generator | list[torch.Generator] | None


def alpha_cumprod(t: float | Tensor, s: float = 0.008, scaler: float = 1.0) -> Tensor:
    """ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), clamped to [1e-4, 0.9999], in float32.

    `scaler` warps time as the official scheduler does (>1: 1−(1−t)^k, <1: t^k). A Python float
    gives a 0-d CPU tensor: the sampling loop's coefficients stay on the host, so it never waits on
    the device, and they round exactly as the reference's float32 arithmetic does.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    s_ = torch.tensor(s, dtype=torch.float32)
    init = torch.cos(s_ / (1 + s_) * math.pi * 0.5) ** 2
    return (torch.cos((t + s_) / (1 + s_) * math.pi * 0.5) ** 2 / init).clamp(1e-4, 0.9999)


def timesteps(num_steps: int) -> list[float]:
    """`num_steps` evenly spaced steps: num_steps + 1 times from 1 to 0."""
    if num_steps < 1:
        raise UserError(f"the number of steps must be at least 1, got {num_steps}")
    return [float(t) for t in torch.linspace(1.0, 0.0, num_steps + 1)]


def shifted_timesteps(num_steps: int, shift: float, s: float = 0.008) -> list[float]:
    """`timesteps(num_steps)` moved to where the official Stable Cascade sampler puts them with a
    schedule shift (its GDF and ComfyUI's `ModelSamplingStableCascade`; Stage C uses shift 2):
    step i has the noise level log SNR(tᵢ) − 2·log(shift), and the network sees the time whose
    unshifted ᾱ is that level. Since a DDPM/DDIM step depends only on the ᾱ of its two times, this
    list of times samples as the shifted schedule does. shift 1 gives `timesteps(num_steps)`."""
    if not shift > 0:
        raise UserError(f"the schedule shift must be > 0, got {shift}")
    times = timesteps(num_steps)
    if shift == 1:
        return times
    s_ = torch.tensor(s, dtype=torch.float64)
    init = torch.cos(s_ / (1 + s_) * math.pi * 0.5) ** 2
    t = torch.tensor(times, dtype=torch.float64)
    ab = (torch.cos((t + s_) / (1 + s_) * math.pi * 0.5) ** 2 / init).clamp(1e-4, 0.9999)
    ab = torch.sigmoid(torch.log(ab / (1 - ab)) - 2 * math.log(shift))
    # The inverse of ᾱ(t) (diffusers' `get_timestep_ratio_conditioning`), kept in [0, 1].
    r = torch.acos((ab * init).sqrt()) / (math.pi * 0.5) * (1 + s_) - s_
    r = r.clamp(0, 1)
    r[0], r[-1] = 1.0, 0.0  # pure noise in, data out, as unshifted
    return [float(x) for x in r]


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, s: float = 0.008, scaler: float = 1.0) -> Tensor:
    """Forward process: √ᾱ·x0 + √(1−ᾱ)·ε, t of shape (B,)."""
    ab = alpha_cumprod(t.float(), s, scaler).view(-1, *[1] * (x0.dim() - 1))
    return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it, so seeds agree.

    A list of generators draws one sample of the batch from each; a CPU generator draws on the CPU
    and the result moves to `device`.
    """
    device = torch.device(device)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise UserError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    if draw_device.type != device.type and draw_device.type == "cpu":
        return torch.randn(tuple(shape), generator=generator, device="cpu", dtype=dtype).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def ddpm_step(x: Tensor, eps: Tensor, t: float, t_prev: float, noise: Tensor | None, s: float = 0.008) -> Tensor:
    """The reference's DDPM step from t to t_prev (α = ᾱ_t/ᾱ_prev):
    μ = (x − (1−α)·ε/√(1−ᾱ_t)) / √α, plus √((1−α)(1−ᾱ_prev)/(1−ᾱ_t))·z unless t_prev = 0.
    The operations run in the reference's order, so float32 results agree to the last bits."""
    ab, ab_prev = alpha_cumprod(t, s), alpha_cumprod(t_prev, s)
    alpha = ab / ab_prev
    mu = (1.0 / alpha).sqrt().item() * (x - (1 - alpha).item() * eps / (1 - ab).sqrt().item())
    if t_prev == 0 or noise is None:
        return mu
    return mu + ((1 - alpha) * (1.0 - ab_prev) / (1.0 - ab)).sqrt().item() * noise


def ddim_step(x: Tensor, eps: Tensor, t: float, t_prev: float, s: float = 0.008) -> Tensor:
    """Deterministic DDIM step: predict x0, then re-noise it to t_prev with the same ε."""
    ab, ab_prev = alpha_cumprod(t, s).item(), alpha_cumprod(t_prev, s).item()
    x0 = (x - eps * math.sqrt(1 - ab)) / math.sqrt(ab)
    if t_prev == 0:
        return x0
    return x0 * math.sqrt(ab_prev) + eps * math.sqrt(1 - ab_prev)


Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, float, Tensor], Tensor | None]


def sample(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float],
    *,
    sampler: str = "ddpm",
    generator: Generator = None,
    s: float = 0.008,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run the reverse process from `times[0]` to `times[-1]`: len(times) − 1 steps.

    `denoiser(x, r)` returns the noise estimate (CFG and dtype casts live in the caller's wrapper).
    The DDPM sampler draws fresh noise at every step, the last one included, exactly as the
    reference does, so a shared generator stays in step with diffusers. `callback(i, t, x)` runs
    after each step and may return a replacement for x.
    """
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
    times = [float(t) for t in times]
    if len(times) < 2:
        raise UserError("a schedule needs at least two times (one step)")
    if any(a <= b for a, b in zip(times, times[1:], strict=False)):
        raise UserError("timesteps must be strictly decreasing, e.g. [1.0, ..., 0.0]")
    for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:], strict=True)):
        r = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        eps = denoiser(x, r).to(x.dtype)
        if sampler == "ddpm":
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = ddpm_step(x, eps, t, t_prev, noise, s)
        else:
            x = ddim_step(x, eps, t, t_prev, s)
        if callback is not None:
            replaced = callback(i, t, x)
            if replaced is not None:
                x = replaced
    return x
