"""Timestep embeddings."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[sin | cos] features of t (shape [B]) with geometric frequencies exp(-log(P) * i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, out_dim or dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim or dim, out_dim or dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.dim).to(dtype or self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))
