"""Programmatic text-image alignment for the shapes world (GenEval-style).

`detect` finds coloured shapes in an image without any learned model:

1. each pixel gets the palette colour of nearest hue if it is not background
   (max channel >= `min_value`), saturated (not grey/white) and within
   `hue_tolerance` degrees of that hue. Hue ignores brightness, so the soft,
   darker edges of a shape keep their colour instead of turning into a
   neighbouring palette colour;
2. same-colour pixels form 8-connected blobs; inside each blob, object pixels
   are those at least `object_threshold` x the blob's peak brightness (a
   half-maximum cut, robust to dim or colour-shifted images), and a blob with
   several bright cores (two blurred objects touching) is split between them;
   holes are filled and objects under `min_area_fraction` of the image dropped;
3. the shape is the template (ellipse, full box, upward triangle, the latter
   also with its apex cut off as blur does it), stretched to the object's
   bounding box, with the highest IoU.

`check` compares detections with a parsed prompt and `score` aggregates.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from ernielab.core.config import Config
from ernielab.worlds.shapes import COLORS, SHAPES, PromptSpec, parse_prompt, shape_coverage

ATTRIBUTES = ("color", "shape", "count", "relation", "all")


@dataclass
class DetectorConfig(Config):
    min_value: float = 0.25  # max channel in [0, 1] for a pixel to be considered at all
    min_saturation: float = 0.35  # rejects grey / white pixels
    hue_tolerance: float = 30.0  # degrees from the nearest palette hue
    object_threshold: float = 0.45  # object pixels: value >= this x the blob's peak (about half max)
    seed_threshold: float = 0.75  # object cores: value >= this x peak; >1 core splits a blob
    min_area_fraction: float = 0.012  # 12 px at 32x32; a small triangle is ~50 px
    min_area: int = 4


@dataclass
class Detection:
    color: str
    shape: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    area: int
    center: tuple[float, float]  # centroid (x, y) of the component's pixels
    shape_score: float = 0.0  # IoU with the chosen shape's template


# ----------------------------------------------------------------------------- image input


def to_uint8_image(image: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any single image -> uint8 [H, W, 3].

    Accepts numpy arrays or torch tensors, HWC or CHW. uint8 is taken as is;
    floats use `value_range` when given, otherwise [-1, 1] if any value is
    negative, [0, 255] if any exceeds 1.5, else [0, 1].
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32 if image.is_floating_point() else image.dtype).numpy()
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one image with 3 dims (HWC or CHW), got shape {image.shape}")
    if image.shape[-1] != 3 and image.shape[0] == 3:
        image = image.transpose(1, 2, 0)
    if image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image with 3 channels, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    if value_range is None:
        value_range = (-1.0, 1.0) if image.min() < 0 else (0.0, 255.0) if image.max() > 1.5 else (0.0, 1.0)
    lo, hi = value_range
    return np.clip(np.rint((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _hue_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV of float RGB in [0, 1]; hue in degrees."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue * 60.0, sat, mx


_PALETTE_NAMES = tuple(COLORS)
_PALETTE_HUES = _hue_saturation_value(np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0)[0]


def color_labels(image: np.ndarray, config: DetectorConfig | None = None) -> np.ndarray:
    """int [H, W]: index into `COLORS` per pixel, -1 for background/unknown."""
    cfg = config or DetectorConfig()
    hue, sat, val = _hue_saturation_value(image.astype(np.float64) / 255.0)
    dist = np.abs(hue[..., None] - _PALETTE_HUES)
    dist = np.minimum(dist, 360.0 - dist)
    labels = dist.argmin(axis=-1)
    ok = (val >= cfg.min_value) & (sat >= cfg.min_saturation) & (dist.min(axis=-1) <= cfg.hue_tolerance)
    return np.where(ok, labels, -1)


# Blur erodes a triangle's apex first, leaving a trapezoid in the thresholded
# mask; triangles whose apex lies this far (fraction of the box height) above
# the box are templates too.
TRIANGLE_APEX_CUTS = (0.0, 0.2, 0.4)


@lru_cache(maxsize=1024)
def _templates(width: int, height: int) -> tuple[tuple[str, np.ndarray], ...]:
    out = [(shape, shape_coverage(shape, width, height) >= 0.5) for shape in ("circle", "square")]
    for cut in TRIANGLE_APEX_CUTS:
        extra = round(cut * height)
        full = shape_coverage("triangle", width, height + extra) >= 0.5
        out.append(("triangle", full[extra:]))
    return tuple(out)


def classify_shape(component: np.ndarray) -> tuple[str, float]:
    """Shape of a boolean mask cropped to its bounding box, and its best template IoU."""
    h, w = component.shape
    best, best_iou = SHAPES[0], -1.0
    for shape, template in _templates(w, h):
        iou = (component & template).sum() / max(1, (component | template).sum())
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return best, best_iou


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _objects_in_blob(blob: np.ndarray, value: np.ndarray, cfg: DetectorConfig, min_area: int) -> list[np.ndarray]:
    """Split one same-colour blob into object masks.

    Thresholding at a fraction of the blob's own peak (not at a fixed level)
    keeps dim or colour-shifted objects whole. Blurred neighbours of one colour
    may still touch, so pixels go to the nearest bright core when there are several.
    """
    peak = np.percentile(value[blob], 95)
    obj = blob & (value >= cfg.object_threshold * peak)
    cores, n_cores = ndimage.label(obj & (value >= cfg.seed_threshold * peak), structure=_EIGHT_CONNECTED)
    big = [k for k, size in enumerate(np.bincount(cores.ravel())[1:], start=1) if size >= min_area]
    if len(big) >= 2:
        core_id = np.where(np.isin(cores, big), cores, 0)
        _, (iy, ix) = ndimage.distance_transform_edt(core_id == 0, return_indices=True)
        nearest = core_id[iy, ix]
        return [obj & (nearest == k) for k in big]
    parts, n = ndimage.label(obj, structure=_EIGHT_CONNECTED)
    return [parts == k for k in range(1, n + 1)]


def detect(image: Any, config: DetectorConfig | None = None) -> list[Detection]:
    """Coloured shapes in one image (see module docstring), largest first."""
    cfg = config or DetectorConfig()
    rgb = to_uint8_image(image)
    labels = color_labels(rgb, cfg)
    value = rgb.max(axis=-1).astype(np.float32) / 255.0
    min_area = max(cfg.min_area, round(cfg.min_area_fraction * rgb.shape[0] * rgb.shape[1]))
    found = []
    for ci, color in enumerate(_PALETTE_NAMES):
        blobs, _ = ndimage.label(labels == ci, structure=_EIGHT_CONNECTED)
        for k, region in enumerate(ndimage.find_objects(blobs), start=1):
            blob = blobs[region] == k
            if region is None or blob.sum() < min_area:
                continue
            for part in _objects_in_blob(blob, value[region], cfg, min_area):
                found.extend(_describe(part, region, color, min_area))
    return sorted(found, key=lambda d: -d.area)


def _describe(part: np.ndarray, region: tuple[slice, slice], color: str, min_area: int) -> list[Detection]:
    """Detection for one object mask (given within `region`), or none if too small."""
    box = ndimage.find_objects(part.astype(np.int32))
    if not box or box[0] is None:
        return []
    ys, xs = box[0]
    mask = ndimage.binary_fill_holes(part[ys, xs])
    area = int(mask.sum())
    if area < min_area:
        return []
    y0, x0 = region[0].start + ys.start, region[1].start + xs.start
    py, px = np.nonzero(mask)
    shape, iou = classify_shape(mask)
    bbox = (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])
    center = (float(px.mean() + x0 + 0.5), float(py.mean() + y0 + 0.5))
    return [Detection(color, shape, bbox, area, center, iou)]


# ----------------------------------------------------------------------------- checking


def relation_satisfied(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Centre a is REL centre b: the offset points the right way and dominates the other axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > 0 and along > abs(across)


def check(prompt: str | PromptSpec, image: Any, detections: list[Detection] | None = None) -> dict[str, bool | None]:
    """Score one image against one prompt.

    - color: every requested colour is among the detections (any shape);
    - shape: every requested (colour, shape) pair is detected at least once;
    - count: for every requested (colour, shape) the number of detections equals
      the requested count, and no other object is detected;
    - relation: None without a relation; otherwise both objects are detected
      and the centroids of the largest matching detections (distinct ones)
      satisfy it: the offset along the relation's axis has the right sign and
      exceeds the offset across it;
    - all: every applicable attribute is True.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    dets = detect(image) if detections is None else detections
    colors = {d.color for d in dets}
    pairs = Counter((d.color, d.shape) for d in dets)
    wanted = Counter()
    for o in spec.objects:
        wanted[(o.color, o.shape)] += o.count
    result: dict[str, bool | None] = {
        "color": all(o.color in colors for o in spec.objects),
        "shape": all(pairs[(o.color, o.shape)] > 0 for o in spec.objects),
        "count": all(pairs[k] == n for k, n in wanted.items()) and sum(pairs.values()) == sum(wanted.values()),
        "relation": None,
    }
    if spec.relation is not None:
        result["relation"] = _check_relation(spec, dets)
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def _check_relation(spec: PromptSpec, dets: list[Detection]) -> bool:
    a_spec, b_spec = spec.objects[0], spec.objects[1]
    a = next((d for d in dets if (d.color, d.shape) == (a_spec.color, a_spec.shape)), None)
    b = next((d for d in dets if (d.color, d.shape) == (b_spec.color, b_spec.shape) and d is not a), None)
    if a is None or b is None:
        return False
    return relation_satisfied(a.center, b.center, spec.relation)


def _iter_images(images: Any) -> Iterable[Any]:
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return (images[i] for i in range(images.shape[0]))
    return iter(images)


def score(
    prompts: Sequence[str | PromptSpec],
    images: Any,
    return_per_image: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Alignment rates over a set of (prompt, image) pairs.

    `images` is a batch (tensor/array [N, ...]) or a sequence of single images.
    Returns {"n", "overall": {attr: rate}, "by_kind": {kind: {attr: rate, "n"}}}
    where a rate is the fraction of images for which the attribute applies
    (relation: relation prompts only) and is True; plus "per_image" if asked.
    """
    n_images = len(images)
    if n_images != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {n_images} images")
    specs = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    from tqdm.auto import tqdm

    rows = []
    for spec, image in tqdm(zip(specs, _iter_images(images)), total=n_images, desc="alignment", disable=not progress):
        rows.append({"prompt": spec.text, "kind": spec.kind, **check(spec, image)})
    out: dict[str, Any] = {"n": len(rows), "overall": _rates(rows), "by_kind": {}}
    groups = defaultdict(list)
    for row in rows:
        groups[row["kind"]].append(row)
    for kind, group in sorted(groups.items()):
        out["by_kind"][kind] = {**_rates(group), "n": len(group)}
    if return_per_image:
        out["per_image"] = rows
    return out


def _rates(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    rates = {}
    for attr in ATTRIBUTES:
        values = [r[attr] for r in rows if r[attr] is not None]
        rates[attr] = float(np.mean(values)) if values else None
    return rates
