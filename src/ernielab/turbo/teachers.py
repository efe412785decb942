"""Teachers for distillation: one or several frozen denoisers mixed by noise-dependent weights (MT-DMD).

A teacher is any pipeline (or transformer) folder `load_transformer` reads, so a plain model, a
fine-tuned specialist or a MoDE folder all work. Each runs with its own CFG scale. The mixture's
velocity at noise level sigma is

    v(x, sigma) = sum_i w_i(sigma) * v_i(x, sigma),   sum_i w_i(sigma) = 1, w_i >= 0,

which mixes the teachers' x0 predictions with the same weights (x0 = x - sigma * v is linear in v).
Weights over sigma are either piecewise linear (each teacher gives [sigma, weight] knots; the curves
are normalised per sigma) or a softmax over -(sigma - center_i)^2 / temperature. A "layout" teacher
with a high-sigma centre and a "detail" teacher with a low one hand over smoothly in between.
Teachers whose weight is zero for the whole batch are not run. The forward also takes explicit weights
(a learned router's, turbo.router) and, apart from them, weights for the CFG-augmentation part (the CA/DM
split of the real score; see TeacherMixture.forward).
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
                uncond: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor | None = None,
                ca_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture's velocity. `weights` [B, K] (default: the sigma weighting) weight the teachers' guided
        velocities. With `ca_weights` [B, K] too, the CFG-augmentation and distribution-matching parts are
        weighted apart (CA/DM split):

            v = sum_k a_k v_k^cond + sum_k b_k (g_k - 1)(v_k^cond - v_k^uncond)        (a = weights, b = ca_weights)
              = sum_k b_k v_k^guided + sum_k (a_k - b_k) v_k^cond,

        computed in the second form, so that b == a adds exact zeros to the unsplit sum (bit-identical)."""
        w = self.weights(sigma) if weights is None else weights
        expand = (-1, *[1] * (x.ndim - 1))
        v = torch.zeros_like(x)
        for i, (model, spec) in enumerate(zip(self.models, self.specs)):
            if ca_weights is None:
                if (w[:, i] > 0).any():
                    v = v + w[:, i].view(expand) * guided_velocity(model, x, sigma, cond, uncond, spec.guidance_scale)
            elif (w[:, i] > 0).any() or (ca_weights[:, i] > 0).any():
                v_cond, v_guided = cond_and_guided_velocity(model, x, sigma, cond, uncond, spec.guidance_scale)
                v = v + ca_weights[:, i].view(expand) * v_guided + (w[:, i] - ca_weights[:, i]).view(expand) * v_cond
        return v

    @torch.no_grad()
    def x0_parts(self, x: torch.Tensor, sigma: torch.Tensor, cond, uncond,
                 with_guidance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per teacher: the conditional x0 prediction [K, B, ...] and (with_guidance) its CFG augmentation
        (g_k - 1)(x0_k^cond - x0_k^uncond) [K, B, ...], so x0_k^cond + augmentation = the guided x0."""
        s = sigma.view(-1, *[1] * (x.ndim - 1))
        conds, augments = [], []
        for model, spec in zip(self.models, self.specs):
            if with_guidance:
                v_cond, v_guided = cond_and_guided_velocity(model, x, sigma, cond, uncond, spec.guidance_scale)
                augments.append(-s * (v_guided - v_cond))
            else:
                v_cond = model(x, sigma * TIMESTEP_SCALE, *cond)
            conds.append(x - s * v_cond)
        return torch.stack(conds), (torch.stack(augments) if with_guidance else None)


def guided_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond, uncond,
                    guidance_scale: float) -> torch.Tensor:
    """CFG velocity at per-sample sigmas (one batched forward for cond + uncond, as `cfg_denoiser`)."""
    return cond_and_guided_velocity(model, x, sigma, cond, uncond, guidance_scale)[1]


def cond_and_guided_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond, uncond,
                             guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional velocity, CFG velocity) at per-sample sigmas from one batched forward (cond + uncond)."""
    t = sigma * TIMESTEP_SCALE
    if guidance_scale == 1.0:
        v_c = model(x, t, *cond)
        return v_c, v_c
    text, lens = _stack_padded([uncond, cond])
    v_u, v_c = model(torch.cat([x, x]), torch.cat([t, t]), text, lens).chunk(2)
    return v_c, v_u + guidance_scale * (v_c - v_u)
