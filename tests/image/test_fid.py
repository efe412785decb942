import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ernielab.image.fid import (
    InceptionFeatures,
    _PrecomputedFeatures,
    compute_fid_kid,
    fid_from_features,
    fid_kid_from_features,
    inception_features,
    kid_from_features,
    resize_bilinear_tf1,
)

torch.set_num_threads(1)
N = 8  # per set: enough to tell distributions apart, small enough for a CPU test


def shapes(n, seed, size=32):
    """Flat-coloured rectangles and ellipses on a pale background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, size - 8, 2)
            x1, y1 = x0 + rng.integers(6, size - x0 + 1), y0 + rng.integers(6, size - y0 + 1)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(v) for v in rng.integers(0, 160, 3)))
        images.append(np.asarray(image))
    return images


def noise(n, seed, size=32):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.fixture(scope="module")
def features():
    return {
        "shapes_a": inception_features(shapes(N, seed=1), progress=False),
        "shapes_b": inception_features(shapes(N, seed=2), progress=False),
        "noise": inception_features(noise(N, seed=3), progress=False),
    }


def test_fid_of_a_set_with_itself_is_zero(features):
    result = fid_kid_from_features(features["shapes_a"], features["shapes_a"])
    assert abs(result["fid"]) < 1e-6  # FID ~ 1e3 here for different sets; only rounding remains
    # KID subsets of one set overlap, which biases this estimate below 0; distinct sets reach ~0.5.
    assert result["kid_mean"] < 0.05 and result["n_real"] == result["n_fake"] == N


def test_same_distribution_is_much_closer_than_a_different_one(features):
    same = fid_kid_from_features(features["shapes_a"], features["shapes_b"])
    different = fid_kid_from_features(features["shapes_a"], features["noise"])
    assert different["fid"] > 2 * same["fid"] > 0  # ~2.8x at 8 images a set; small sets inflate FID
    assert different["kid_mean"] > same["kid_mean"] + 5 * different["kid_std"]


def test_low_rank_projection_gives_torchmetrics_full_answer():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.rand(64, 6, generator=generator)
    real = torch.relu(torch.randn(10, 6, generator=generator) @ mixing.T + 0.3).double()
    fake = torch.relu(torch.randn(8, 6, generator=generator) @ mixing.T + 0.6).double()
    full = FrechetInceptionDistance(feature=_PrecomputedFeatures(64))
    full.update(real, real=True)
    full.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(full.compute()), rel=1e-6, abs=1e-6)


def test_kid_subset_size_for_small_sets(features):
    real, fake = features["shapes_a"], features["noise"][:6]  # 8 and 6 images
    mean, std = kid_from_features(real, fake)  # subset = half the smaller set, so subsets differ
    assert std > 0
    assert kid_from_features(real, fake, seed=5)[0] != mean
    assert kid_from_features(real, fake)[0] == mean  # seeded, reproducible
    assert kid_from_features(real[:6], fake, subset_size=6)[1] == pytest.approx(0, abs=1e-12)  # whole sets: no spread
    with pytest.raises(ValueError, match="kid_subset_size"):
        kid_from_features(real, fake, subset_size=7)
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid_from_features(real, fake[:1])


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_works_as_a_torchmetrics_feature_extractor(features):
    # The first images of a seeded draw equal the first ones of the fixture's larger draw.
    kid = KernelInceptionDistance(feature=InceptionFeatures(), subsets=3, subset_size=2)
    kid.update(torch.from_numpy(np.stack(shapes(3, seed=1))).permute(0, 3, 1, 2), real=True)
    kid.update(noise(2, seed=3), real=False)
    reference = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=2)
    reference.update(features["shapes_a"][:3], real=True)
    reference.update(features["noise"][:2], real=False)
    assert torch.allclose(torch.cat(kid.real_features), features["shapes_a"][:3], atol=1e-4)
    torch.manual_seed(0)
    direct = kid.compute()[0].item()
    torch.manual_seed(0)
    assert direct == pytest.approx(reference.compute()[0].item(), rel=1e-3)
    assert features["shapes_a"].shape == (N, 2048) and (features["shapes_a"] >= 0).all()  # pooled ReLU outputs


def test_compute_fid_kid_accepts_lists_and_tensors():
    small = shapes(2, seed=4, size=20)
    result = compute_fid_kid(small, noise(3, seed=5, size=24), progress=False)
    assert set(result) == {"fid", "kid_mean", "kid_std", "n_real", "n_fake"}
    assert result["n_real"] == 2 and result["n_fake"] == 3 and result["fid"] > 0
    with pytest.raises(ValueError, match="sizes must match"):
        compute_fid_kid(small + shapes(1, seed=6, size=16), small, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        InceptionFeatures()(torch.zeros(1, 3, 8, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fid-helper scripts its resize with torch.jit
def test_resize_matches_tensorflow_convention():
    x = torch.arange(4.0).view(1, 1, 1, 4)
    # TF1 bilinear, align_corners=False: target j samples source j * in/out, clamped at the edge.
    assert torch.allclose(resize_bilinear_tf1(x, 8)[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    try:
        from fid_helper_pytorch._resample_func import nv_bilinear
    except ImportError:
        return
    images = torch.rand(2, 3, 17, 23) * 255
    assert torch.allclose(resize_bilinear_tf1(images, 299), nv_bilinear(images, (299, 299)), atol=0.02)
