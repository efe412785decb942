"""Rotary position embeddings over N position axes.

ERNIE-Image layout: each axis a contributes dims[a] rotary dims with frequencies theta^(-2i/dims[a]);
the per-axis angle lists are concatenated, every angle is repeated twice ([t0, t0, t1, t1, ...]) and
the rotation pairs dimension i with i + head_dim/2 (rotate-half). The release trained with exactly
this pairing, so it is kept for weight compatibility.
"""
from __future__ import annotations

import torch


def axis_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """pos [..., n] -> angles [..., n, dim/2] in fp32 (autocast off: bf16 cannot hold integer ids > 256)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    with torch.autocast(device_type=pos.device.type, enabled=False):
        return pos.float()[..., None] * freqs


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...] | list[int], theta: float) -> torch.Tensor:
    """ids [B, S, n_axes] -> angles [B, S, 1, sum(axes_dim)] with each angle repeated twice."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, rope expects {len(axes_dim)}")
    angles = torch.cat([axis_angles(ids[..., a], d, theta) for a, d in enumerate(axes_dim)], dim=-1)
    return angles.repeat_interleave(2, dim=-1).unsqueeze(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute (cos, sin) once per forward instead of once per layer and per q/k."""
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, S, H, D]; rope = angles [B, S, 1, R] (R <= D) or their (cos, sin); dims past R pass unrotated."""
    cos, sin = rope if isinstance(rope, tuple) else rope_cos_sin(rope)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.numel() else out
