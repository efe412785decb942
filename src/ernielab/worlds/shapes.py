"""Procedural "shapes world": coloured circles, squares and triangles on black.

Every scene has a caption whose facts (colours, shapes, counts, spatial
relation) can be checked programmatically on a generated image, see
`ernielab.worlds.alignment`. Three scene kinds, mirroring GenEval's tasks:

- "single":   one object ("a red circle")
- "count":    two or three identical objects ("three small yellow triangles")
- "relation": two different objects, object 0 REL object 1, with REL one of
              "left of", "right of", "above", "below" ("a red circle to the left
              of a green triangle")

Shapes are axis-aligned and drawn inside a square bounding box of side `s`;
triangles point up. Rendering is 4x supersampled, so edges are soft like a
generated image's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ernielab.core.config import Config

# Hues 0/60/120/180/240/287 degrees with the same brightest channel, so the
# detector can classify by hue and treat brightness as coverage.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (220, 220, 40),
    "green": (40, 220, 40),
    "cyan": (40, 220, 220),
    "blue": (40, 40, 220),
    "purple": (180, 40, 220),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
KINDS = ("single", "count", "relation")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
DEFAULT_KIND_WEIGHTS = {"single": 0.4, "count": 0.2, "relation": 0.4}

# Object side as a fraction of the image side: 10 and 14 px at 32x32, the
# smallest sizes at which a circle, square and triangle stay distinguishable.
SIZE_FRACTION = {"small": 0.30, "large": 0.44}
SIZE_JITTER_FRACTION = 0.03  # +-1 px at 32
BORDER_FRACTION = 0.03  # keep objects off the image edge
GAP_FRACTION = 0.06  # min empty space between two objects (2 px at 32)
OFF_AXIS_RATIO = 0.5  # relation scenes: |off-axis offset| <= 0.5 * on-axis offset
SUPERSAMPLE = 4

# A scene's content hash decides which split may hold it, so no image is in
# two splits. Buckets out of 10: train 8, val 1, test 1.
SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# ----------------------------------------------------------------------------- scenes


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass
class Scene:
    objects: list[ShapeObject]
    kind: str
    relation: str | None = None  # object 0 REL object 1
    image_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scene":
        objects = [ShapeObject(o["shape"], o["color"], o["size"], tuple(o["bbox"])) for o in data["objects"]]
        return cls(objects, data["kind"], data.get("relation"), data.get("image_size", 32))

    def content_hash(self) -> int:
        """Hash of what is drawn (order-free), used to keep splits disjoint."""
        key = sorted((o.shape, o.color, tuple(int(v) for v in o.bbox)) for o in self.objects)
        digest = hashlib.blake2b(repr((self.image_size, key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")


def object_side(size: str, image_size: int) -> int:
    return max(3, round(SIZE_FRACTION[size] * image_size))


def _gap(image_size: int) -> int:
    return max(2, round(GAP_FRACTION * image_size))


def _border(image_size: int) -> int:
    return max(1, round(BORDER_FRACTION * image_size))


def _jittered_side(rng: np.random.Generator, size: str, image_size: int) -> int:
    jitter = round(SIZE_JITTER_FRACTION * image_size)
    return object_side(size, image_size) + int(rng.integers(-jitter, jitter + 1))


def _separated(a, b, gap: int):
    """Boxes (x0, y0, x1, y1) are at least `gap` pixels apart along some axis (works on arrays)."""
    return (a[2] + gap <= b[0]) | (b[2] + gap <= a[0]) | (a[3] + gap <= b[1]) | (b[3] + gap <= a[1])


def _relation_mask(a, b, relation: str, gap: int):
    """Box a is clearly REL box b: `gap` apart along the axis, roughly aligned across it (works on arrays)."""
    ax, ay, bx, by = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if relation == "left of":
        return (a[2] + gap <= b[0]) & (np.abs(ay - by) <= OFF_AXIS_RATIO * (bx - ax))
    if relation == "right of":
        return (b[2] + gap <= a[0]) & (np.abs(ay - by) <= OFF_AXIS_RATIO * (ax - bx))
    if relation == "above":
        return (a[3] + gap <= b[1]) & (np.abs(ax - bx) <= OFF_AXIS_RATIO * (by - ay))
    if relation == "below":
        return (b[3] + gap <= a[1]) & (np.abs(ax - bx) <= OFF_AXIS_RATIO * (ay - by))
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def relation_holds(a: Sequence[int], b: Sequence[int], relation: str, gap: int) -> bool:
    """Box a (x0, y0, x1, y1) clearly stands REL box b, as every relation scene guarantees."""
    return bool(_relation_mask(tuple(a), tuple(b), relation, gap))


def _place(
    rng: np.random.Generator, sides: Sequence[int], image_size: int, relation: str | None = None, tries: int = 512
) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping boxes of the given sides (None when none found).

    All tries are drawn at once and checked as arrays; the first valid one wins.
    """
    border, gap = _border(image_size), _gap(image_size)
    side = np.asarray(sides)
    hi = image_size - border - side
    if (hi < border).any():
        return None
    corner = rng.integers(border, hi[None, :, None] + 1, size=(tries, len(side), 2))
    x0, y0 = corner[..., 0], corner[..., 1]
    boxes = [(x0[:, i], y0[:, i], x0[:, i] + side[i], y0[:, i] + side[i]) for i in range(len(side))]
    ok = np.ones(tries, dtype=bool)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            ok &= _separated(boxes[i], boxes[j], gap)
    if relation is not None:
        ok &= _relation_mask(boxes[0], boxes[1], relation, gap)
    if not ok.any():
        return None
    t = int(ok.argmax())
    return [tuple(int(v[t]) for v in box) for box in boxes]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_kind(rng: np.random.Generator, weights: Mapping[str, float] | Sequence[str] | None) -> str:
    if weights is None:
        weights = DEFAULT_KIND_WEIGHTS
    if not isinstance(weights, Mapping):
        weights = {k: 1.0 for k in weights}
    unknown = set(weights) - set(KINDS)
    if unknown or not weights:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {sorted(weights)}")
    names = list(weights)
    p = np.asarray([weights[k] for k in names], dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"kind weights must be non-negative with a positive sum, got {dict(weights)}")
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 32,
    kind: str | None = None,
    kind_weights: Mapping[str, float] | None = None,
) -> Scene:
    """A random scene; `kind` None draws one from `kind_weights` (default 0.4/0.2/0.4)."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for shapes to be recognisable, got {image_size}")
    kind = kind or _sample_kind(rng, kind_weights)
    if kind == "single":
        specs = [(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, SIZES))]
        relation = None
    elif kind == "count":
        n = int(rng.integers(2, 4))
        specs = [(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, SIZES))] * n
        relation = None
    elif kind == "relation":
        first = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
        second = first
        while second == first:
            second = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
        specs = [(*first, _pick(rng, SIZES)), (*second, _pick(rng, SIZES))]
        relation = _pick(rng, RELATIONS)
    else:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    return _layout(rng, specs, kind, relation, image_size)


def _layout(
    rng: np.random.Generator, specs: list[tuple[str, str, str]], kind: str, relation: str | None, image_size: int
) -> Scene:
    """Place objects, shrinking large ones to small when they do not fit."""
    specs = list(specs)
    while True:
        # Identical objects of a count scene share one jittered side.
        if kind == "count":
            sides = [_jittered_side(rng, specs[0][2], image_size)] * len(specs)
        else:
            sides = [_jittered_side(rng, size, image_size) for _, _, size in specs]
        boxes = _place(rng, sides, image_size, relation)
        if boxes is not None:
            objects = [ShapeObject(shape, color, size, box) for (shape, color, size), box in zip(specs, boxes)]
            return Scene(objects, kind, relation, image_size)
        if all(size == "small" for _, _, size in specs):
            raise RuntimeError(f"cannot place {len(specs)} objects in a {image_size}px image")
        largest = max(range(len(specs)), key=lambda i: sides[i])
        targets = range(len(specs)) if kind == "count" else [largest]
        for i in targets:
            specs[i] = (specs[i][0], specs[i][1], "small")


def scene_from_prompt(prompt: "str | PromptSpec", rng: np.random.Generator, image_size: int = 32) -> Scene:
    """A random scene that satisfies a prompt (an oracle for testing the checker)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    specs = [(o.shape, o.color, o.size or _pick(rng, SIZES)) for o in spec.objects for _ in range(o.count)]
    if spec.relation is not None and len(specs) != 2:
        raise ValueError("scene_from_prompt supports relations between exactly two single objects")
    if spec.kind == "count":  # a count scene's objects share one size
        specs = [specs[0]] * len(specs)
    return _layout(rng, specs, spec.kind, spec.relation, image_size)


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=256)
def shape_coverage(shape: str, width: int, height: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of a `height` x `width` box covered by the shape.

    The shape fills the box: ellipse for "circle", the whole box for "square",
    an upward triangle (apex at top centre, base along the bottom) for "triangle".
    """
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    y, x = np.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        inside = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1.0
    elif shape == "square":
        inside = np.ones_like(x, dtype=bool)
    elif shape == "triangle":
        inside = np.abs(x - width / 2) <= (y / height) * (width / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    cov = inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov


def _coverages(scene: Scene) -> Iterable[tuple[int, ShapeObject, np.ndarray, tuple[slice, slice]]]:
    for i, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.bbox
        if not (0 <= x0 < x1 <= scene.image_size and 0 <= y0 < y1 <= scene.image_size):
            raise ValueError(f"object {i} bbox {obj.bbox} lies outside a {scene.image_size}px image")
        yield i, obj, shape_coverage(obj.shape, x1 - x0, y1 - y0), (slice(y0, y1), slice(x0, x1))


def render(scene: Scene) -> np.ndarray:
    """RGB uint8 [H, W, 3] image of the scene on black."""
    canvas = np.zeros((scene.image_size, scene.image_size, 3), dtype=np.float32)
    for _, obj, cov, region in _coverages(scene):
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        canvas[region] += cov[..., None] * np.asarray(COLORS[obj.color], dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_mask(scene: Scene) -> np.ndarray:
    """int64 [H, W]: 0 background, i + 1 where object i covers at least half the pixel."""
    mask = np.zeros((scene.image_size, scene.image_size), dtype=np.int64)
    for i, _, cov, region in _coverages(scene):
        mask[region][cov >= 0.5] = i + 1
    return mask


# ----------------------------------------------------------------------------- captions


def _noun(shape: str, count: int) -> str:
    return shape + ("s" if count != 1 else "")


def object_phrase(color: str, shape: str, count: int = 1, size: str | None = None) -> str:
    """"a red circle", "two small blue squares"."""
    number = "a" if count == 1 else NUMBER_WORDS[count]
    words = [number] + ([size] if size else []) + [color, _noun(shape, count)]
    return " ".join(words)


RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
SINGLE_TEMPLATES = (
    "{a}", "a photo of {a}", "an image of {a}", "there is {a}", "{a} on a black background", "a picture of {a}"
)
COUNT_TEMPLATES = ("{a}", "a photo of {a}", "an image of {a}", "there are {a}", "{a} on a black background")
RELATION_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "a photo of {a} {rel} {b}", "there is {a} {rel} {b}")
SIZE_WORD_PROB = 0.35


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A randomly templated caption; size words appear sometimes."""

    def phrase(obj: ShapeObject, count: int = 1) -> str:
        size = obj.size if rng.random() < SIZE_WORD_PROB else None
        return object_phrase(obj.color, obj.shape, count, size)

    if scene.kind == "single":
        return _pick(rng, SINGLE_TEMPLATES).format(a=phrase(scene.objects[0]))
    if scene.kind == "count":
        return _pick(rng, COUNT_TEMPLATES).format(a=phrase(scene.objects[0], len(scene.objects)))
    if scene.kind == "relation":
        a, b, rel = scene.objects[0], scene.objects[1], scene.relation
        if rng.random() < 0.5:  # "B is right of A" says the same as "A is left of B"
            a, b, rel = b, a, INVERSE_RELATION[rel]
        return _pick(rng, RELATION_TEMPLATES).format(a=phrase(a), rel=RELATION_PHRASES[rel], b=phrase(b))
    raise ValueError(f"unknown scene kind {scene.kind!r}")


def canonical_prompt(spec: "PromptSpec") -> str:
    """The plain template of a prompt spec: "a red circle to the left of a green triangle"."""
    parts = [object_phrase(o.color, o.shape, o.count, o.size) for o in spec.objects]
    if spec.relation:
        return f"{parts[0]} {RELATION_PHRASES[spec.relation]} {parts[1]}"
    return parts[0]


# ----------------------------------------------------------------------------- prompt parsing


@dataclass
class ObjectSpec:
    count: int
    color: str
    shape: str
    size: str | None = None


@dataclass
class PromptSpec:
    objects: list[ObjectSpec]
    relation: str | None = None  # object 0 REL object 1
    kind: str = "single"
    text: str = ""


_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUMBERS.update({str(i): i for i in range(1, 10)})
_SIZE_ALIASES = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_RELATION_ALIASES = {"left": "left of", "right": "right of", "above": "above", "over": "above",
                     "below": "below", "under": "below", "beneath": "below", "underneath": "below"}


def _alt(words: Iterable[str]) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_OBJ = (
    rf"(?:(?P<num{{i}}>{_alt(_NUMBERS)})\s+)?(?:(?P<size{{i}}>{_alt(_SIZE_ALIASES)})\s+)?"
    rf"(?P<color{{i}}>{_alt(COLORS)})\s+(?P<shape{{i}}>{_alt(SHAPES)})(?P<plural{{i}}>e?s)?"
)
_REL = (
    r"(?:(?:is|are)\s+)?(?:(?:(?:to|on)\s+the\s+)?(?P<side>left|right)\s+(?:side\s+)?of"
    r"|(?P<vert>above|over|below|under|beneath|underneath))"
)
_PREFIX = r"(?:(?:a|an|the)\s+(?:photo|image|picture|rendering|drawing)\s+(?:of|with)\s+|there\s+(?:is|are)\s+)?"
_SUFFIX = r"(?:\s+(?:on|against)\s+(?:a\s+)?black\s+background|\s+in\s+the\s+(?:image|picture|photo))?"
_PROMPT_RE = re.compile(
    rf"^{_PREFIX}{_OBJ.format(i=0)}(?:\s+{_REL}\s+{_OBJ.format(i=1)})?{_SUFFIX}$"
)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a shapes-world prompt (any caption `caption` or `make_prompts` makes).

    Case, whitespace, trailing punctuation and plural forms are tolerated; a
    prompt outside the grammar raises `ValueError`.
    """
    if not isinstance(text, str):
        raise ValueError(f"cannot parse shapes-world prompt: expected a string, got {type(text).__name__}")
    norm = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!").strip()
    norm = norm.replace(",", "")
    m = _PROMPT_RE.match(norm)
    if m is None:
        raise ValueError(f"cannot parse shapes-world prompt: {text!r}")
    objects = []
    for i in range(2):
        if m.group(f"color{i}") is None:
            continue
        number, plural = m.group(f"num{i}"), bool(m.group(f"plural{i}"))
        if number is None and plural:
            raise ValueError(f"cannot parse shapes-world prompt: {text!r} (plural without a count)")
        count = _NUMBERS[number] if number else 1
        size = _SIZE_ALIASES.get(m.group(f"size{i}") or "")
        objects.append(ObjectSpec(count, m.group(f"color{i}"), m.group(f"shape{i}"), size))
    relation = None
    if len(objects) == 2:
        relation = _RELATION_ALIASES[m.group("side") or m.group("vert")]
        kind = "relation"
    else:
        kind = "count" if objects[0].count > 1 else "single"
    return PromptSpec(objects, relation, kind, text)


# ----------------------------------------------------------------------------- evaluation prompts


def make_prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    """`n` canonical evaluation prompts of one kind, balanced over all combinations.

    The full set of combinations (18 singles, 36 counts, 1224 relations) is
    shuffled and cycled, so every combination appears before any repeats.
    """
    return [spec.text for spec in make_prompt_specs(kind, n, seed)]


def make_prompt_specs(kind: str, n: int, seed: int = 0) -> list[PromptSpec]:
    """The specs behind `make_prompts(kind, n, seed)`, each with its canonical prompt as `text`."""
    if kind == "single":
        combos = [[ObjectSpec(1, c, s)] for c in COLORS for s in SHAPES]
        specs = [PromptSpec(objs, None, kind) for objs in combos]
    elif kind == "count":
        specs = [PromptSpec([ObjectSpec(k, c, s)], None, kind) for k in (2, 3) for c in COLORS for s in SHAPES]
    elif kind == "relation":
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        specs = [
            PromptSpec([ObjectSpec(1, *a), ObjectSpec(1, *b)], rel, kind)
            for a in pairs for b in pairs if a != b for rel in RELATIONS
        ]
    else:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind)]))
    chosen: list[PromptSpec] = []
    while len(chosen) < n:
        chosen += [specs[j] for j in rng.permutation(len(specs))]
    return [dataclasses.replace(s, objects=[dataclasses.replace(o) for o in s.objects], text=canonical_prompt(s))
            for s in chosen[:n]]


def combination_prompt_specs(holdout: Sequence[str], n: int, seed: int = 0) -> dict[str, list[PromptSpec]]:
    """Relation prompts for a compositional split: `n` that state a held-out combination and `n` that state none.

    "heldout": combination i % len(holdout) as the subject ("a red triangle to the left of ..."), with a random
    other object; "seen": relation prompts (as `make_prompts` draws them) whose subject and object both avoid
    every held-out combination, so a model trained with `holdout_combinations` has seen each of them.
    """
    combos = [parse_combination(c) for c in holdout]
    if not combos:
        raise ValueError("combination_prompt_specs needs at least one held-out combination")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    heldout = []
    for i in range(n):
        color, shape, relation = combos[i % len(combos)]
        others = [p for p in pairs if p != (color, shape)]
        other = others[int(rng.integers(len(others)))]
        heldout.append(PromptSpec([ObjectSpec(1, color, shape), ObjectSpec(1, *other)], relation, "relation"))
    seen = [spec for spec in make_prompt_specs("relation", 1224, seed) if not _states_combination(spec, combos)]
    out = {"heldout": heldout, "seen": (seen * (n // max(1, len(seen)) + 1))[:n]}
    for specs in out.values():
        for spec in specs:
            spec.text = canonical_prompt(spec)
    return out


def _states_combination(spec: PromptSpec, combos: Sequence[tuple[str, str, str]]) -> bool:
    a, b = spec.objects
    return (a.color, a.shape, spec.relation) in combos or (b.color, b.shape, INVERSE_RELATION[spec.relation]) in combos


# ----------------------------------------------------------------------------- dataset


@dataclass
class ShapesWorldConfig(Config):
    image_size: int = 32
    seed: int = 0
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    caption_styles: dict[str, float] = field(default_factory=dict)  # empty: templates only
    holdout_combinations: list[str] = field(default_factory=list)  # "red triangle left of": never in a scene


def _check_split(split: str) -> str:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
    return split


def parse_combination(text: str) -> tuple[str, str, str]:
    """"red triangle left of" -> ("red", "triangle", "left of"): a colour x shape as the subject of a relation."""
    words = text.strip().lower().split() if isinstance(text, str) else []
    if len(words) >= 3 and words[0] in COLORS and words[1] in SHAPES and " ".join(words[2:]) in RELATIONS:
        return words[0], words[1], " ".join(words[2:])
    raise ValueError(f"not a held-out combination: {text!r}; expected 'COLOUR SHAPE RELATION' with a colour of "
                     f"{tuple(COLORS)}, a shape of {SHAPES} and a relation of {RELATIONS}, e.g. 'red triangle left of'")


def parse_combinations(texts: Sequence[str]) -> tuple[tuple[str, str, str], ...]:
    """Parse held-out combinations; ValueError when they leave no relation scene to draw."""
    combos = tuple(parse_combination(t) for t in texts)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    left = any((*a, r) not in combos and (*b, INVERSE_RELATION[r]) not in combos
               for a in pairs for b in pairs if a != b for r in RELATIONS)
    if combos and not left:
        raise ValueError(f"the {len(combos)} held-out combinations leave no relation scene to draw")
    return combos


def has_combination(scene: Scene, combinations: Iterable[tuple[str, str, str]]) -> bool:
    """The scene shows one of the (colour, shape, relation) combinations: an object of that colour and shape
    stands in that relation to the other object. "B right of A" is "A left of B", so both objects count."""
    if scene.relation is None:
        return False
    a, b = scene.objects[0], scene.objects[1]
    shown = {(a.color, a.shape, scene.relation), (b.color, b.shape, INVERSE_RELATION[scene.relation])}
    return any(c in shown for c in combinations)


def sample_item_scene(
    seed: int, split: str, index: int, image_size: int = 32, kinds: Mapping[str, float] | Sequence[str] | None = None,
    holdout: Sequence[tuple[str, str, str]] = (),
) -> tuple[Scene, np.random.Generator]:
    """The scene of item `index` of a split, and the generator that drew it.

    Scenes are redrawn until their content hash falls in the split's buckets,
    so the same picture never appears in two splits, and until they show none
    of the `holdout` combinations (see `has_combination`).
    """
    _check_split(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    buckets = SPLIT_BUCKETS[split]
    while True:
        scene = sample_scene(rng, image_size, kind=_sample_kind(rng, kinds))
        if scene.content_hash() % 10 in buckets and not (holdout and has_combination(scene, holdout)):
            return scene, rng


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesWorld(torch.utils.data.Dataset):
    """Deterministic procedural dataset: item i depends only on (seed, split, i).

    Items are dicts: `image` float32 [3, H, W] in [-1, 1], `caption` str,
    `boxes` float32 [n, 4] (x0, y0, x1, y1 pixels), `mask` int64 [H, W]
    (0 background, i + 1 object i), `kind` str and `scene` (JSON-able dict).
    `kinds` is None (default weights), a list of kinds (uniform) or a dict of weights.
    `caption_styles`: weights of `phrasing.STYLES` for captions (None/empty: templates only, as `caption`);
    `holdout_combinations`: "colour shape relation" strings no scene of this dataset shows.
    """

    def __init__(
        self,
        size: int,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        kinds: Mapping[str, float] | Sequence[str] | None = None,
        caption_styles: Mapping[str, float] | None = None,
        holdout_combinations: Sequence[str] = (),
    ):
        if size < 0:
            raise ValueError(f"dataset size must be >= 0, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.size, self.image_size, self.seed = size, image_size, seed
        self.split = _check_split(split)
        if isinstance(kinds, str):
            kinds = [kinds]
        self.kinds = kinds
        _sample_kind(np.random.default_rng(0), kinds)  # validate now, not in a worker
        self.caption_styles = dict(caption_styles or {})
        if self.caption_styles:
            from ernielab.worlds.phrasing import check_style_weights

            check_style_weights(self.caption_styles)
        self.holdout = parse_combinations(holdout_combinations)

    @classmethod
    def from_config(cls, config: ShapesWorldConfig, size: int, split: str = "train") -> "ShapesWorld":
        return cls(size, config.image_size, config.seed, split, config.kind_weights, config.caption_styles,
                   config.holdout_combinations)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[Scene, str]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesWorld of size {self.size}")
        index %= self.size
        scene, rng = sample_item_scene(self.seed, self.split, index, self.image_size, self.kinds, self.holdout)
        if not self.caption_styles:
            return scene, caption(scene, rng)
        from ernielab.worlds.phrasing import diversified_caption

        return scene, diversified_caption(scene, rng, self.caption_styles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, text = self.scene(index)
        return {
            "image": image_to_tensor(render(scene)),
            "caption": text,
            "boxes": torch.tensor([o.bbox for o in scene.objects], dtype=torch.float32),
            "mask": torch.from_numpy(render_mask(scene)),
            "kind": scene.kind,
            "scene": scene.to_dict(),
        }


def collate_shapes(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DataLoader collate_fn: stacks images and masks, keeps the rest as lists."""
    if not batch:
        raise ValueError("collate_shapes got an empty batch")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "boxes": [b["boxes"] for b in batch],
        "kind": [b["kind"] for b in batch],
        "scene": [b["scene"] for b in batch],
    }


def save_split(dataset: ShapesWorld, out_dir: str | Path, progress: bool = True) -> Path:
    """Write `images/{i:06d}.png` and `captions.jsonl` (file, caption, kind, scene)."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp = out / "captions.jsonl.tmp"
    with tmp.open("w") as f:
        for i in tqdm(range(len(dataset)), desc=f"shapes {dataset.split}", disable=not progress):
            scene, text = dataset.scene(i)
            name = f"images/{i:06d}.png"
            Image.fromarray(render(scene)).save(out / name)
            f.write(json.dumps({"file": name, "caption": text, "kind": scene.kind, "scene": scene.to_dict()}) + "\n")
    tmp.replace(out / "captions.jsonl")  # a finished index means a finished split
    return out
