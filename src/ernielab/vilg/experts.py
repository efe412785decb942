"""Mixture of denoising experts (MoDE, ERNIE-ViLG 2.0): one denoiser per interval of noise levels.

Expert i owns the noise levels sigma in [b_i, b_{i+1}) of its boundaries 0 = b_0 < ... < b_N = 1
(the last interval also holds sigma = 1). With uniform boundaries this is

    expert = min(N - 1, floor(sigma * N)),   sigma = timestep / 1000,

so expert 0 denoises the last (low-noise, detail) steps and expert N-1 the first (pure-noise,
layout) ones; the paper's `t // 100` for 10 experts over 1000 steps is the same rule. During
sampling every image of a batch sits at one sigma, so exactly one expert runs per step and the
inference cost is that of one expert. Boundaries need not be uniform and experts need not be
alike (e.g. a small layout expert at high noise and a large detail expert at low noise).

On disk a MoDE is ONE folder: config.json (model_type, boundaries, each expert's class + config)
and model.safetensors (keys `experts.<i>.<param>`). Importing this module registers its loader,
so `TextToImagePipeline.from_pretrained` loads a MoDE pipeline folder unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from ernielab.core.config import Config
from ernielab.core.persistence import CONFIG_NAME, WEIGHTS_NAME, load_checked, save_model_folder
from ernielab.image.config import check_interchangeable
from ernielab.image.flow_matching import TIMESTEP_SCALE

MODEL_TYPE = "mixture_of_denoising_experts"


# ---- boundaries and routing ------------------------------------------------------------------
def uniform_boundaries(n: int) -> tuple[float, ...]:
    """N equal intervals of [0, 1]: (0, 1/N, ..., 1)."""
    if n < 1:
        raise ValueError(f"need at least one expert, got {n}")
    return tuple(i / n for i in range(n + 1))


def check_boundaries(boundaries: Sequence[float]) -> tuple[float, ...]:
    b = tuple(float(v) for v in boundaries)
    if len(b) < 2 or b[0] != 0.0 or b[-1] != 1.0 or any(lo >= hi for lo, hi in zip(b, b[1:])):
        raise ValueError(f"expert boundaries must rise strictly from 0 to 1, got {list(boundaries)}")
    return b


def is_uniform(boundaries: Sequence[float]) -> bool:
    n = len(boundaries) - 1
    return all(math.isclose(v, i / n, abs_tol=1e-12) for i, v in enumerate(boundaries))


def expert_index(sigma: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """[B] long: the expert owning each noise level sigma in [0, 1].

    Computed in float64. Uniform boundaries use the documented min(N-1, floor(sigma*N)) exactly;
    others: the i with b_i <= sigma < b_{i+1}.
    """
    b = check_boundaries(boundaries)
    n = len(b) - 1
    s = torch.as_tensor(sigma).double().reshape(-1)
    if is_uniform(b):
        return torch.floor(s * n).clamp(0, n - 1).long()
    inner = torch.tensor(b[1:-1], dtype=torch.float64, device=s.device)
    return torch.bucketize(s, inner, right=True).clamp(0, n - 1)


def expert_of_timestep(timestep: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """Routing on the model's 0..1000 timestep scale."""
    return expert_index(torch.as_tensor(timestep).double() / TIMESTEP_SCALE, boundaries)


# ---- config ----------------------------------------------------------------------------------
def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith("ernielab."):  # a checkpoint names code to import: only our own
        raise ValueError(f"refusing to import expert class {path!r} from a checkpoint (not an ernielab class)")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass
class MoDEConfig(Config):
    """Boundaries plus one {"class", "config_class", "config"} entry per expert."""

    boundaries: tuple[float, ...] = (0.0, 1.0)
    experts: list = dataclasses.field(default_factory=list)
    model_type: str = MODEL_TYPE

    def __post_init__(self):
        self.boundaries = check_boundaries(self.boundaries)
        if self.experts and len(self.experts) != len(self.boundaries) - 1:
            raise ValueError(f"{len(self.experts)} experts for {len(self.boundaries) - 1} intervals")

    def expert_config(self, i: int) -> Config:
        entry = self.experts[i]
        return _import_class(entry["config_class"]).from_dict(entry["config"])

    # The pipeline and trainer read these off `transformer.config`; all experts share them.
    @property
    def text_in_dim(self) -> int:
        return self.experts[0]["config"]["text_in_dim"]

    @property
    def in_channels(self) -> int:
        return self.experts[0]["config"]["in_channels"]

    @property
    def out_channels(self) -> int:
        return self.experts[0]["config"]["out_channels"]


# ---- the module ------------------------------------------------------------------------------
class MixtureOfDenoisingExperts(nn.Module):
    """Wraps N denoisers with the ErnieImageTransformer forward; each sample runs its owning expert only."""

    def __init__(self, experts: Sequence[nn.Module], boundaries: Sequence[float] | None = None):
        super().__init__()
        experts = list(experts)
        boundaries = uniform_boundaries(len(experts)) if boundaries is None else check_boundaries(boundaries)
        if len(experts) != len(boundaries) - 1:
            raise ValueError(f"{len(experts)} experts need {len(experts) + 1} boundaries, got {len(boundaries)}")
        for i, expert in enumerate(experts[1:], start=1):
            check_interchangeable(experts[0].config, expert.config, f"expert {i} vs. expert 0")
        self.experts = nn.ModuleList(experts)
        self.boundaries = boundaries

    @classmethod
    def from_single(cls, model: nn.Module, n: int, boundaries: Sequence[float] | None = None):
        """N copies of one trained model (stage 2 of MoDE training starts here)."""
        return cls([copy.deepcopy(model) for _ in range(n)], boundaries)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def config(self) -> MoDEConfig:
        entries = [{"class": _class_path(e), "config_class": _class_path(e.config), "config": e.config.to_dict()}
                   for e in self.experts]
        return MoDEConfig(boundaries=self.boundaries, experts=entries)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(getattr(e, "gradient_checkpointing", False) for e in self.experts)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for e in self.experts:
            e.gradient_checkpointing = value

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        return expert_of_timestep(timestep, self.boundaries).to(timestep.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters one sampling step touches: the largest expert."""
        return max(sum(p.numel() for p in e.parameters()) for e in self.experts)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_lens: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.expand(B) if timestep.ndim == 0 else timestep
        if timestep.shape != (B,):
            raise ValueError(f"timestep has {timestep.shape[0]} entries for a batch of {B}")
        idx = self.route(timestep)
        present = idx.unique().tolist()
        if len(present) == 1:  # sampling: the whole batch sits at one noise level
            return self.experts[present[0]](x, timestep, text, text_lens, attn_bias)
        out = None
        for e in present:
            sel = (idx == e).nonzero().squeeze(1)
            bias = attn_bias
            if attn_bias is not None and attn_bias.ndim == 4 and attn_bias.shape[0] == B:
                bias = attn_bias[sel]
            y = self.experts[e](x[sel], timestep[sel], text[sel],
                                None if text_lens is None else text_lens[sel], bias)
            if out is None:
                out = y.new_zeros((B, *y.shape[1:]))
            out = out.index_copy(0, sel, y)
        return out

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model_folder(self, self.config, path, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "MixtureOfDenoisingExperts":
        path = Path(path)
        if not is_mode_folder(path):
            raise FileNotFoundError(f"{path} is not a mixture-of-denoising-experts folder "
                                    f"({CONFIG_NAME} with model_type {MODEL_TYPE!r} missing)")
        config = MoDEConfig.load(path / CONFIG_NAME)
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
        experts = [_import_class(e["class"])(config.expert_config(i)) for i, e in enumerate(config.experts)]
        model = cls(experts, config.boundaries)
        load_checked(model, load_file(str(path / WEIGHTS_NAME)), f"mixture of experts (from {path})")
        return model.to(dtype)


def is_mode_folder(path: str | Path) -> bool:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def load_mode_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> MixtureOfDenoisingExperts:
    """The loader `ernielab.image.registry` calls for a folder `is_mode_folder` accepts."""
    return MixtureOfDenoisingExperts.from_pretrained(path, dtype)
