"""Feed-forward blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeGLU(nn.Module):
    """gelu(gate(x)) * up(x) -> down, no biases (ERNIE-Image MLP)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """Plain two-layer GELU MLP (baselines, heads)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
