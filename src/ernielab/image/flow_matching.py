"""Rectified-flow (flow-matching) training math.

Convention (as the ERNIE-Image release and FLUX-style schedulers): sigma in [0, 1],
x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity v = noise - x0,
and the network sees timestep = 1000 * sigma.
"""
from __future__ import annotations

import torch

TIMESTEP_SCALE = 1000.0
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static timestep shift: spends more steps/samples at high noise for shift > 1."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    mode: str = "logit_normal",
    shift: float = 1.0,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw training noise levels: 'uniform' or 'logit_normal' (SD3), then the static shift."""
    if mode == "uniform":
        s = torch.rand(batch, generator=generator)
    elif mode == "logit_normal":
        s = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r} (use 'uniform' or 'logit_normal')")
    return shift_sigmas(s, shift).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample MSE between predicted and true velocity; `weight` (broadcastable to pred) reweights positions."""
    err = (pred.float() - velocity_target(x0, noise).float()) ** 2
    if weight is not None:
        err = err * weight
    return err.flatten(1).mean(1)
