"""A learned teacher router for MT-DMD: weights W_k(x_t, sigma, c) over the K teachers, per objective.

ERNIE-Image Turbo's MT-DMD mixes expert teachers as x0 = sum_k W_k(x_t, sigma, c, O) E_k(x_t, sigma, c), with
W_k in [0, 1] and O the objective: the CFG-augmentation (CA) and the distribution-matching (DM) terms of the
generator update are routed separately. The report gives that form, not how W is trained; the rule here:

- **Form.** A small MLP reads a summary of x_t (per-channel mean and std), Fourier features of sigma and the
  caption's mean text feature, and adds its logits to the log of the configured sigma-only weights (the
  `teachers` knots or softmax centres, floored at PRIOR_FLOOR). Its last layer starts at zero, so an untrained
  router *is* the sigma weighting (up to the floor); the network learns a correction. A softmax per objective
  keeps the weights in [0, 1] with sum 1.
- **Training.** Jointly with the student, one Adam step per generator update, on the step's *real* data batch
  re-noised to sigma ~ U[dmd_sigma_min, dmd_sigma_max] (where the DMD loss uses it):
  * DM head: MSE between sum_k W_k x0_k^cond and the clean data, i.e. the weights favour the teacher whose
    conditional prediction (its estimate of E[x0 | x_t, c]) is best there.
  * CA head (with `router_split`): MSE between [DM mixture, detached] + sum_k W_k (g_k - 1)(x0_k^cond -
    x0_k^uncond) and the clean data, i.e. the weights favour the teacher whose guidance direction best
    explains what the conditional mixture still misses. Without the split, the DM head's weights are applied
    to each teacher's whole guided prediction (the sigma-only path's form).
"""
from __future__ import annotations

import math

import torch
from torch import nn

PRIOR_FLOOR = 1e-4  # a teacher with zero sigma weight starts at this share (log 0 would pin it there forever)
SIGMA_FREQUENCIES = 8


def text_summary(text: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[B, L, D] padded text features and [B] lengths -> [B, D] mean over each caption's own tokens."""
    mask = (torch.arange(text.shape[1], device=text.device)[None] < lens[:, None]).to(text.dtype)
    return (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def sigma_features(sigma: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1 + 2F]: sigma and cos/sin(pi k sigma), k = 1..F."""
    k = torch.arange(1, SIGMA_FREQUENCIES + 1, device=sigma.device, dtype=torch.float32)
    angles = math.pi * sigma.float()[:, None] * k[None]
    return torch.cat([sigma.float()[:, None], angles.cos(), angles.sin()], dim=1)


def latent_summary(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 2C]: per-channel mean and std (what the noisy image looks like, cheaply)."""
    flat = x.float().flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


class TeacherRouter(nn.Module):
    """(x_t, sigma, caption) -> [B, objectives, K] teacher weights, softmax over K, on top of a sigma prior."""

    def __init__(self, latent_channels: int, text_dim: int, n_teachers: int, n_objectives: int = 1, hidden: int = 64):
        super().__init__()
        self.n_teachers, self.n_objectives = n_teachers, n_objectives
        width = 2 * latent_channels + 1 + 2 * SIGMA_FREQUENCIES + text_dim
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_objectives * n_teachers))
        nn.init.zeros_(self.net[-1].weight)  # untrained router = the sigma prior
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
                prior: torch.Tensor) -> torch.Tensor:
        """prior: [B, K] sigma-only weights (sum 1). Returns [B, objectives, K] weights in [0, 1], sum 1 over K."""
        features = torch.cat([latent_summary(x), sigma_features(sigma), text_summary(*cond).float()], dim=1)
        logits = self.net(features).view(-1, self.n_objectives, self.n_teachers)
        return torch.softmax(logits + prior.float().clamp_min(PRIOR_FLOOR).log()[:, None], dim=-1)
