"""Tiered aesthetic benchmarks: a self-generated one, and a reader for the ERIA-1K layout.

ERIA-1K (ERNIE-Image-Aes-1K, huggingface.co/datasets/baidu/ERIA-1K-Benchmark) ships as

    ERIA-1K-Benchmark/test/test.json
    ERIA-1K-Benchmark/test/000001.jpg, 000002.jpg, ...

with tier labels 1-10 (10 = best) that professional annotators produced through a pairwise
Swiss-system tournament; models are scored by SRCC and PLCC between their scores and the tiers.
The dataset card does not spell out the JSON schema of `test.json`, so this reader takes the
obvious forms and the writer emits the first one:

    [{"image": "000001.png", "tier": 7}, ...]          # list of entries (what `write_split` writes)
    {"000001.jpg": 7, ...}                              # image -> tier mapping

Entry keys may also be spelt "image_path" / "path" / "file" and "score" / "label". Image paths
are relative to the folder holding the JSON file.

The generated benchmark imitates that protocol on shapes-world renders:

1. each source image (held-out splits of `ShapesWorld`, train and test disjoint by content)
   gets random degradations at controlled severities (noise, blur, JPEG, desaturation, colour
   cast, contrast loss, occlusion, pixelation);
2. a latent quality is minus the weighted sum of the severities;
3. a noisy judge compares two images: P(a beats b) = sigmoid((q_a - q_b) / judge_noise), a
   Bradley-Terry rater;
4. a Swiss-system tournament asks that judge for a few rounds of pairings between images of
   similar standing, a Bradley-Terry fit orders the images, and a few rounds of adjacent-pair
   judgments refine that order (odd-even transposition: with a noiseless judge the order is
   exact);
5. tiers are deciles of the final order (tier 10 = best tenth).

Written per split: `<root>/<split>/<split>.json` (ERIA layout), `<split>/judgments.json` (every
pairwise judgment: [winner, loser] indices into the list, the scorer's training signal),
`<split>/annotations.json` (latent quality, severities, rank) and `<root>/benchmark.json`.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from ernielab.core.config import Config, bounded
from ernielab.core.seeding import derive_seed

NUM_TIERS = 10
IMAGE_KEYS = ("image", "image_path", "path", "file")
TIER_KEYS = ("tier", "score", "label")

# How much each degradation at full severity costs in latent quality (a judge's taste).
DEFAULT_WEIGHTS = {
    "occlusion": 1.0, "pixelate": 0.9, "blur": 1.0, "contrast": 0.6,
    "desaturate": 0.5, "color_cast": 0.7, "noise": 1.0, "jpeg": 0.7,
}


# ----------------------------------------------------------------------------- degradations
# Each takes float32 [H, W, 3] in [0, 255], a severity in [0, 1] and a generator; strengths are
# relative to the image side so a 64px benchmark looks like a 32px one, only finer.


def _occlusion(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = x.shape
    side_h, side_w = max(1, round(h * math.sqrt(0.4 * s))), max(1, round(w * math.sqrt(0.4 * s)))
    y0, x0 = int(rng.integers(0, h - side_h + 1)), int(rng.integers(0, w - side_w + 1))
    x = x.copy()
    x[y0 : y0 + side_h, x0 : x0 + side_w] = rng.uniform(60, 200)
    return x


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _pixelate(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = x.shape
    factor = 1 + 3 * s  # up to 4x coarser
    small = _pil(x).resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST), dtype=np.float32)


def _blur(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    radius = 1.6 * s * x.shape[0] / 32
    return np.asarray(_pil(x).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _contrast(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean()
    return mean + (x - mean) * (1 - 0.75 * s)


def _desaturate(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    gray = x @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return x * (1 - s) + gray[..., None] * s


def _color_cast(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=3)
    return x + (90 * s * direction / np.linalg.norm(direction)).astype(np.float32)


def _noise(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0, 60 * s, size=x.shape).astype(np.float32)


def _jpeg(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(x).save(buffer, format="JPEG", quality=int(round(90 - 85 * s)))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)


# Applied in this order: geometry first, then colour, then sensor noise, then compression.
DEGRADATIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "occlusion": _occlusion, "pixelate": _pixelate, "blur": _blur, "contrast": _contrast,
    "desaturate": _desaturate, "color_cast": _color_cast, "noise": _noise, "jpeg": _jpeg,
}


def degrade(image: np.ndarray, severities: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] with each named degradation applied at its severity in [0, 1]."""
    unknown = set(severities) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradations {sorted(unknown)}; expected some of {list(DEGRADATIONS)}")
    x = image.astype(np.float32)
    for name, fn in DEGRADATIONS.items():
        s = severities.get(name, 0.0)
        if s > 0:
            x = fn(np.clip(x, 0, 255), s, rng)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- judge + tournament


def noisy_judge(quality: np.ndarray, noise: float, rng: np.random.Generator) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """judge(a, b) -> bool array "a wins": a Bradley-Terry rater of temperature `noise` (0 = noiseless)."""

    def judge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = quality[a] - quality[b]
        if noise <= 0:
            return diff > 0
        return rng.random(len(a)) < 1 / (1 + np.exp(-diff / noise))

    return judge


def fit_bradley_terry(winners: np.ndarray, losers: np.ndarray, n: int, l2: float = 0.01) -> np.ndarray:
    """MAP Bradley-Terry strengths [n] from judgments, with a Gaussian prior so unbeaten items stay finite."""
    from scipy.optimize import minimize  # scipy, not torch.optim: that import alone costs seconds

    winners, losers = np.asarray(winners), np.asarray(losers)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = theta[winners] - theta[losers]
        loss = np.logaddexp(0, -margin).sum() + 0.5 * l2 * theta @ theta
        dmargin = -1 / (1 + np.exp(margin))  # d softplus(-m) / dm
        grad = l2 * theta
        np.add.at(grad, winners, dmargin)
        np.add.at(grad, losers, -dmargin)
        return loss, grad

    return minimize(objective, np.zeros(n), jac=True, method="L-BFGS-B").x


def _swiss_pairs(order: np.ndarray, met: set[tuple[int, int]], window: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pair each unpaired item with the next unpaired one in standing order it has not met yet
    (a rematch only when none within `window` is fresh). An odd item out sits the round out."""
    paired = np.zeros(len(order), dtype=bool)
    a, b = [], []
    for i in range(len(order)):
        if paired[i]:
            continue
        candidates = [j for j in range(i + 1, len(order)) if not paired[j]][:window]
        if not candidates:
            break
        fresh = [j for j in candidates if (min(order[i], order[j]), max(order[i], order[j])) not in met]
        j = (fresh or candidates)[0]
        paired[i] = paired[j] = True
        a.append(order[i])
        b.append(order[j])
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


@dataclass
class TournamentResult:
    order: np.ndarray  # item indices, best first
    points: np.ndarray  # Swiss-round wins per item
    winners: np.ndarray  # every judgment asked, Swiss and refinement rounds
    losers: np.ndarray

    def ranks(self) -> np.ndarray:
        """rank[i]: 0 for the best item."""
        ranks = np.empty(len(self.order), dtype=np.int64)
        ranks[self.order] = np.arange(len(self.order))
        return ranks

    def tiers(self, num_tiers: int = NUM_TIERS) -> np.ndarray:
        return tiers_from_ranks(self.ranks(), num_tiers)


def swiss_tournament(n: int, judge: Callable[[np.ndarray, np.ndarray], np.ndarray], swiss_rounds: int,
                     refine_rounds: int, rng: np.random.Generator) -> TournamentResult:
    """Swiss rounds (pair by points, no rematches), a Bradley-Terry order, then adjacent-pair refinement."""
    if n < 2:
        raise ValueError(f"a tournament needs at least 2 items, got {n}")
    points = np.zeros(n)
    tiebreak = rng.permutation(n)  # random seating before the first round
    met: set[tuple[int, int]] = set()
    winners, losers = [], []
    for _ in range(swiss_rounds):
        order = np.lexsort((tiebreak, -points))
        a, b = _swiss_pairs(order, met)
        a_wins = judge(a, b)
        win, lose = np.where(a_wins, a, b), np.where(a_wins, b, a)
        points[win] += 1
        met.update(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
        winners.append(win)
        losers.append(lose)
    if winners:
        strength = fit_bradley_terry(np.concatenate(winners), np.concatenate(losers), n)
        order = np.lexsort((tiebreak, -strength))
    else:
        order = tiebreak.copy()
    quiet_rounds = 0
    for r in range(refine_rounds):
        left = np.arange(r % 2, n - 1, 2)
        a, b = order[left], order[left + 1]
        a_wins = judge(a, b)
        winners.append(np.where(a_wins, a, b))
        losers.append(np.where(a_wins, b, a))
        swap = left[~a_wins]
        order[swap], order[swap + 1] = order[swap + 1], order[swap].copy()
        quiet_rounds = quiet_rounds + 1 if len(swap) == 0 else 0
        if quiet_rounds == 2:  # both parities agree with the order: every neighbour pair is confirmed
            break
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
    return TournamentResult(order, points, cat(winners), cat(losers))


def tiers_from_ranks(ranks: np.ndarray, num_tiers: int = NUM_TIERS) -> np.ndarray:
    """Deciles of the order: tier num_tiers for the best tenth, 1 for the worst."""
    n = len(ranks)
    from_bottom = n - 1 - np.asarray(ranks)
    return 1 + (from_bottom * num_tiers) // n


# ----------------------------------------------------------------------------- benchmark builder


@dataclass
class TieredBenchmarkConfig(Config):
    n_train: int = bounded(1000, ge=2)
    n_test: int = bounded(500, ge=2)
    image_size: int = bounded(32, ge=16)  # the bundled model's size, so the scorer sees what the generator makes
    seed: int = 0
    kinds: tuple[str, ...] = tuple(DEFAULT_WEIGHTS)
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    active_prob: float = bounded(0.4, ge=0, le=1)  # each degradation is present with this probability
    judge_noise: float = bounded(0.2, ge=0)  # Bradley-Terry temperature of the judge, in quality units
    swiss_rounds: int = bounded(12, ge=1)
    refine_rounds: int = bounded(6, ge=0)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(DEGRADATIONS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {list(DEGRADATIONS)}, got {list(self.kinds)}")
        missing = set(self.kinds) - set(self.weights)
        if missing:
            raise ValueError(f"no quality weight for degradations {sorted(missing)}")


def sample_severities(cfg: TieredBenchmarkConfig, rng: np.random.Generator) -> dict[str, float]:
    return {k: float(rng.uniform(0, 1)) for k in cfg.kinds if rng.random() < cfg.active_prob}


def latent_quality(severities: dict[str, float], weights: dict[str, float]) -> float:
    return -sum(weights[k] * s for k, s in severities.items())


def make_split(cfg: TieredBenchmarkConfig, split: str, n: int, progress: bool = True) -> dict:
    """Images (uint8 [n, H, W, 3]), severities, qualities, tournament and tiers of one split."""
    from tqdm.auto import tqdm

    from ernielab.worlds.shapes import ShapesWorld, render

    sources = ShapesWorld(n, cfg.image_size, seed=cfg.seed, split=split)
    images, severities = [], []
    for i in tqdm(range(n), desc=f"degrade {split}", disable=not progress, leave=False):
        rng = np.random.default_rng(derive_seed(cfg.seed, "tiered-degrade", split, i))
        sev = sample_severities(cfg, rng)
        images.append(degrade(render(sources.scene(i)[0]), sev, rng))
        severities.append(sev)
    quality = np.asarray([latent_quality(s, cfg.weights) for s in severities])
    rng = np.random.default_rng(derive_seed(cfg.seed, "tiered-judge", split))
    judge = noisy_judge(quality, cfg.judge_noise, rng)
    result = swiss_tournament(n, judge, cfg.swiss_rounds, cfg.refine_rounds, rng)
    return {"images": np.stack(images), "severities": severities, "quality": quality, "tournament": result}


def write_split(root: str | Path, split: str, images: np.ndarray, tiers: np.ndarray) -> list[str]:
    """`<root>/<split>/<split>.json` + images 000001.png ...; returns the relative image names."""
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / name)
    entries = [{"image": name, "tier": int(t)} for name, t in zip(names, tiers)]
    (folder / f"{split}.json").write_text(json.dumps(entries, indent=1) + "\n")
    return names


def build_benchmark(root: str | Path, cfg: TieredBenchmarkConfig, progress: bool = True) -> dict:
    """Generate train and test splits under `root` (see the module docstring); returns the summary."""
    from scipy.stats import spearmanr

    cfg.validate()  # before anything is written
    root = Path(root)
    summary: dict = {"config": cfg.to_dict(), "splits": {}}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        if n < 2:
            raise ValueError(f"{split} split needs at least 2 images, got {n}")
        data = make_split(cfg, split, n, progress)
        result: TournamentResult = data["tournament"]
        tiers = result.tiers()
        names = write_split(root, split, data["images"], tiers)
        folder = root / split
        (folder / "judgments.json").write_text(json.dumps(
            {"pairs": np.stack([result.winners, result.losers], 1).tolist(), "images": names}) + "\n")
        ranks = result.ranks()
        annotations = [{"image": name, "quality": float(q), "severities": sev, "rank": int(r), "tier": int(t),
                        "swiss_points": float(p)}
                       for name, q, sev, r, t, p in zip(names, data["quality"], data["severities"], ranks, tiers,
                                                        result.points)]
        (folder / "annotations.json").write_text(json.dumps(annotations, indent=1) + "\n")
        agree = (data["quality"][result.winners] > data["quality"][result.losers]).mean()
        summary["splits"][split] = {
            "n": n, "judgments": len(result.winners),
            "judge_agrees_with_quality": float(agree),
            # How well the tiers recover the hidden quality: the ceiling for any scorer.
            "srcc_tier_vs_quality": float(spearmanr(tiers, data["quality"]).statistic),
        }
    (root / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- reader


@dataclass
class TieredItem:
    path: Path
    tier: int


def _split_file(location: str | Path, split: str) -> Path:
    """Accept the benchmark root, the split folder, or the JSON file itself."""
    location = Path(location)
    for candidate in (location, location / f"{split}.json", location / split / f"{split}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {split}.json at {location} (expected {location / split / f'{split}.json'})")


def _entries(data, path: Path) -> list[tuple[object, object, str]]:
    """(image, tier, label for errors) triples from a list of entries or an image -> tier mapping."""
    if isinstance(data, dict):
        return [(image, tier, f"entry {image!r}") for image, tier in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{'image', 'tier'}} entries or an image -> tier mapping")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is not an object: {entry!r}")
        image = next((entry[k] for k in IMAGE_KEYS if k in entry), None)
        tier = next((entry[k] for k in TIER_KEYS if k in entry), None)
        if image is None:
            raise ValueError(f"{path}: entry {i} has no image path (one of {IMAGE_KEYS}): {entry!r}")
        if tier is None:
            raise ValueError(f"{path}: entry {i} ({image!r}) has no tier (one of {TIER_KEYS})")
        out.append((image, tier, f"entry {i} ({image!r})"))
    return out


def read_tiered(location: str | Path, split: str = "test", num_tiers: int = NUM_TIERS) -> list[TieredItem]:
    """Items of an ERIA-1K-layout split; every problem names the offending entry."""
    path = _split_file(location, split)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    items = []
    for image, tier, label in _entries(data, path):
        if isinstance(tier, bool) or not isinstance(tier, (int, float)) or tier != int(tier):
            raise ValueError(f"{path}: {label} has tier {tier!r}, expected an integer 1..{num_tiers}")
        if not 1 <= tier <= num_tiers:
            raise ValueError(f"{path}: {label} has tier {tier}, outside 1..{num_tiers}")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path}: {label} has an invalid image path")
        image_path = path.parent / image
        if not image_path.is_file():
            raise FileNotFoundError(f"{path}: {label} points to a missing image {image_path}")
        items.append(TieredItem(image_path, int(tier)))
    if not items:
        raise ValueError(f"{path} lists no images")
    return items


def read_judgments(location: str | Path, split: str = "train") -> tuple[list[Path], np.ndarray]:
    """Image paths and [P, 2] (winner, loser) index pairs of a generated split."""
    folder = _split_file(location, split).parent
    path = folder / "judgments.json"
    if not path.is_file():
        raise FileNotFoundError(f"no pairwise judgments at {path} (make one with `ernielab aesthetic make-benchmark`)")
    data = json.loads(path.read_text())
    images = [folder / name for name in data["images"]]
    pairs = np.asarray(data["pairs"], dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(images)):
        raise ValueError(f"{path}: pair indices outside 0..{len(images) - 1}")
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} images missing, e.g. {missing[0]}")
    return images, pairs


def load_images(paths: list[Path]) -> list[np.ndarray]:
    """uint8 [H, W, 3] arrays (sizes may differ between images)."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    return out
