"""Teachers for distillation: one or several frozen denoisers mixed by noise-dependent weights (MT-DMD).

A teacher is any pipeline (or transformer) folder `load_transformer` reads, so a plain model, a
fine-tuned specialist or a MoDE folder all work. Each runs with its own CFG scale. The mixture's
velocity at noise level sigma is

    v(x, sigma) = sum_i w_i(sigma) * v_i(x, sigma),   sum_i w_i(sigma) = 1, w_i >= 0,

which mixes the teachers' x0 predictions with the same weights (x0 = x - sigma * v is linear in v).
Weights over sigma are either piecewise linear (each teacher gives [sigma, weight] knots; the curves
are normalised per sigma) or a softmax over -(sigma - center_i)^2 / temperature. A "layout" teacher
with a high-sigma centre and a "detail" teacher with a low one hand over smoothly in between.
Teachers whose weight is zero for the whole batch are not run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ernielab.core.config import Config, bounded
from ernielab.image.flow_matching import TIMESTEP_SCALE
from ernielab.image.samplers import _stack_padded

WEIGHTINGS = ("piecewise_linear", "softmax")


@dataclasses.dataclass
class TeacherSpec(Config):
    path: str = ""  # a pipeline or transformer folder
    guidance_scale: float = bounded(4.0, ge=0)
    knots: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # [[sigma, weight], ...]; [] = 1
    center: float = 0.5  # softmax: the noise level this teacher owns most

    def check(self) -> None:
        if not self.path:
            raise ValueError("every teacher needs a path (a pipeline or transformer folder)")
        for knot in self.knots:
            if not 0.0 <= knot[0] <= 1.0 or knot[1] < 0:
                raise ValueError(f"teacher {self.path}: knots must be [sigma in 0..1, weight >= 0], got {list(knot)}")


def parse_teachers(entries: Sequence[dict | TeacherSpec]) -> list[TeacherSpec]:
    specs = [e if isinstance(e, TeacherSpec) else TeacherSpec.from_dict(e) for e in entries]
    if not specs:
        raise ValueError("distillation needs at least one teacher (teachers: [{\"path\": ...}])")
    for spec in specs:
        spec.validate()
    return specs


def mixture_weights(sigma: torch.Tensor, specs: Sequence[TeacherSpec], weighting: str = "piecewise_linear",
                    temperature: float = 0.05) -> torch.Tensor:
    """[B] noise levels -> [B, K] non-negative weights that sum to 1 over the K teachers."""
    s = sigma.detach().double().cpu().reshape(-1)
    if weighting == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax weighting needs temperature > 0, got {temperature}")
        centers = torch.tensor([spec.center for spec in specs], dtype=torch.float64)
        w = torch.softmax(-(s[:, None] - centers[None]) ** 2 / temperature, dim=1)
    elif weighting == "piecewise_linear":
        w = torch.stack([_piecewise(s, spec.knots) for spec in specs], dim=1)
        total = w.sum(1, keepdim=True)
        if (total <= 0).any():
            bad = s[(total[:, 0] <= 0)][0].item()
            raise ValueError(f"teacher weights are all zero at sigma={bad:.3f}: the knots must cover 0..1")
        w = w / total
    else:
        raise ValueError(f"unknown teacher weighting {weighting!r} (use one of {WEIGHTINGS})")
    return w.to(sigma.device, torch.float32)


def _piecewise(s: torch.Tensor, knots: list) -> torch.Tensor:
    if not knots:
        return torch.ones_like(s)
    xs, ys = zip(*sorted((float(a), float(b)) for a, b in knots))
    return torch.from_numpy(np.interp(s.numpy(), xs, ys))  # constant beyond the first / last knot


class TeacherMixture(nn.Module):
    """Frozen teachers with per-teacher CFG, mixed by sigma-dependent weights; forward returns a velocity."""

    def __init__(self, models: Sequence[nn.Module], specs: Sequence[TeacherSpec],
                 weighting: str = "piecewise_linear", temperature: float = 0.05):
        super().__init__()
        if len(models) != len(specs):
            raise ValueError(f"{len(models)} teacher models for {len(specs)} specs")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown teacher weighting {weighting!r} (use one of {WEIGHTINGS})")
        self.models = nn.ModuleList(m.eval().requires_grad_(False) for m in models)
        self.specs, self.weighting, self.temperature = list(specs), weighting, temperature
        mixture_weights(torch.linspace(0, 1, 101), self.specs, weighting, temperature)  # fail early on bad knots

    @classmethod
    def load(cls, specs: Sequence[TeacherSpec], weighting: str = "piecewise_linear", temperature: float = 0.05,
             device="cpu") -> "TeacherMixture":
        from ernielab.image.registry import load_transformer

        models = []
        for spec in specs:
            path = Path(spec.path)
            folder = path / "transformer" if (path / "transformer").is_dir() else path
            models.append(load_transformer(folder).to(device))
        return cls(models, specs, weighting, temperature)

    def weights(self, sigma: torch.Tensor) -> torch.Tensor:
        return mixture_weights(sigma, self.specs, self.weighting, self.temperature)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
                uncond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w = self.weights(sigma)
        v = torch.zeros_like(x)
        for i, (model, spec) in enumerate(zip(self.models, self.specs)):
            if (w[:, i] > 0).any():
                v = v + w[:, i].view(-1, *[1] * (x.ndim - 1)) * guided_velocity(
                    model, x, sigma, cond, uncond, spec.guidance_scale)
        return v


def guided_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond, uncond,
                    guidance_scale: float) -> torch.Tensor:
    """CFG velocity at per-sample sigmas (one batched forward for cond + uncond, as `cfg_denoiser`)."""
    t = sigma * TIMESTEP_SCALE
    if guidance_scale == 1.0:
        return model(x, t, *cond)
    text, lens = _stack_padded([uncond, cond])
    v_u, v_c = model(torch.cat([x, x]), torch.cat([t, t]), text, lens).chunk(2)
    return v_u + guidance_scale * (v_c - v_u)
