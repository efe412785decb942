"""Samplers as plain functions (k-diffusion style): a denoiser maps (x, sigma[B]) -> velocity."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ernielab.image.flow_matching import TIMESTEP_SCALE, shift_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigma_schedule(steps: int, shift: float = 4.0) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0, evenly spaced then shifted (FlowMatchEuler, static shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma[0] to sigma[-1] with Euler steps.

    `callback(i, x)` runs after step i (x now at noise level sigmas[i + 1]); a tensor it returns replaces x.

    Each update is computed in float32 and stored back in x's dtype (as diffusers' FlowMatchEulerDiscreteScheduler
    does; for float32 latents this is the plain update)."""
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling", leave=False):
        s = sigmas[i].expand(x.shape[0]).to(x.device)
        v = denoiser(x, s)
        dt = (sigmas[i + 1] - sigmas[i]).float()
        x = (x.float() + dt * v.float()).to(x.dtype) if x.dtype != torch.float32 else x + dt * v.to(x.dtype)
        if callback is not None:
            replaced = callback(i, x)
            if replaced is not None:
                x = replaced
    return x


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first schedule step an image-to-image run takes: the first (1 - strength) fraction of the
    steps is skipped, as diffusers' FlowMatch img2img pipelines do (`get_timesteps`); strength 1 -> 0."""
    init = min(steps * strength, steps)
    return int(max(steps - init, 0))


def model_denoiser(model, text: torch.Tensor, text_lens: torch.Tensor,
                   timestep_dtype: torch.dtype | None = None) -> Denoiser:
    """Wrap an ErnieImageTransformer-like model (timestep on the 0..1000 scale) as a denoiser. `timestep_dtype`:
    round the timestep to it first (diffusers' ErnieImagePipeline passes it in the transformer's dtype)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma * TIMESTEP_SCALE
        return model(x, t if timestep_dtype is None else t.to(timestep_dtype), text, text_lens)

    return denoise


def cfg_denoiser(
    model,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    guidance_scale: float,
    timestep_dtype: torch.dtype | None = None,
) -> Denoiser:
    """Classifier-free guidance with one batched forward: v = v_u + g * (v_c - v_u). g <= 1 skips the uncond pass."""
    if guidance_scale <= 1.0:
        return model_denoiser(model, *cond, timestep_dtype=timestep_dtype)
    text, lens = _stack_padded([uncond, cond])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = torch.cat([sigma, sigma]) * TIMESTEP_SCALE
        v = model(torch.cat([x, x]), t if timestep_dtype is None else t.to(timestep_dtype), text, lens)
        v_u, v_c = v.chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    return denoise


def _stack_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (text [B,T_i,D], lens [B]) pairs along the batch, right-padding to the longest T."""
    T = max(t.shape[1] for t, _ in parts)
    padded = [torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[1])) for t, _ in parts]
    return torch.cat(padded), torch.cat([lens for _, lens in parts])
