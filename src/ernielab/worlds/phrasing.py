"""Many wordings of the same shapes-world facts, with a held-out set for evaluation.

A prompt's facts (colours, shapes, counts, sizes, the relation and its subject) can be worded in five
styles:

- "template":   today's training captions (`shapes.caption`), e.g. "a photo of two red circles";
- "paraphrase": free natural rewordings ("the picture shows a single red circle");
- "detailed":   a structured description listing each object's colour, shape, size and position
                ("two objects: a large red circle near the left edge and a small green triangle near the
                right edge; the red circle is to the left of the green triangle");
- "keywords":   a comma-separated keyword list ("red circle, left of, green triangle, black background");
- "digits":     numbers as digits ("3 yellow triangles").

Every wording comes from one of two phrasebooks. TRAIN holds the frames and the number, size, relation and
position wordings that training captions use; EVAL holds different ones ("exactly one", "a pair of",
"further left than", "i see {a}", ...). The two share no frame and no wording (colour and shape words aside,
which are the facts themselves), so an evaluation prompt drawn from EVAL is held out by construction;
`could_produce` matches a text against a phrasebook's whole grammar, which the tests use to show that no
eval prompt is a string the train grammar can make.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

from ernielab.worlds.shapes import (
    COLORS,
    COUNT_TEMPLATES,
    INVERSE_RELATION,
    KINDS,
    RELATION_PHRASES,
    RELATION_TEMPLATES,
    SHAPES,
    SINGLE_TEMPLATES,
    SIZE_WORD_PROB,
    ObjectSpec,
    PromptSpec,
    Scene,
    canonical_prompt,
    caption,
    make_prompt_specs,
)

STYLES = ("template", "paraphrase", "detailed", "keywords", "digits")
SPLITS = ("train", "eval")
EVAL_STYLES = STYLES[1:]  # templates are the training wording: no held-out template exists
# Training-caption mix: templates keep 0.4 so the model keeps its template skill (and the text encoder's
# features for them stay in distribution); free paraphrases take the largest share of the rest because they
# vary the most; detailed, keyword and digit captions share the remainder equally.
DEFAULT_STYLE_WEIGHTS = {"template": 0.4, "paraphrase": 0.3, "detailed": 0.1, "keywords": 0.1, "digits": 0.1}

# Position of an object's centre in thirds of the image, for detailed descriptions.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
# Where a relation puts its two objects, when a detailed description of a bare prompt needs positions.
RELATION_POSITIONS = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
                      "below": ("bottom", "top")}
HEADER_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Phrasebook:
    """Frames (with slots {a}, {b}, {rel}, {n}, {the_a}, {the_b}, {where_a}, {where_b}, {where_list}) and wordings."""

    name: str
    frames: Mapping[tuple[str, str], tuple[str, ...]]  # (style, kind) -> frames
    numbers: Mapping[str, Mapping[int, tuple[str, ...]]]  # style -> count -> number words ("" = none said)
    sizes: Mapping[str, tuple[str, ...]]
    relations: Mapping[str, tuple[str, ...]]
    positions: Mapping[str, str]
    definite: str = "the"

    def wordings(self) -> dict[str, set[str]]:
        """Every frame and wording, by category (normalised), to compare phrasebooks."""
        numbers = {w for per_count in self.numbers.values() for ws in per_count.values() for w in ws if w}
        return {
            "frames": {_normalise_frame(f) for fs in self.frames.values() for f in fs},
            "numbers": numbers,
            "sizes": {w for ws in self.sizes.values() for w in ws},
            "relations": {w for ws in self.relations.values() for w in ws},
            "positions": set(self.positions.values()),
            "definite": {self.definite},
        }


def _normalise_frame(frame: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "{}", frame).strip()


_TRAIN_SINGLE = ("{a}", "a drawing of {a}", "the picture shows {a}", "{a} in the picture", "an illustration of {a}",
                 "{a} on black", "here is {a}", "a black image with {a}")
_TRAIN_COUNT = ("{a}", "a drawing of {a}", "the picture shows {a}", "{a} in the picture", "an illustration of {a}",
                "{a} on black", "here are {a}")
_TRAIN_RELATION = ("{a} {rel} {b}", "{a} placed {rel} {b}", "the picture shows {a} {rel} {b}", "{a} sits {rel} {b}",
                   "a drawing of {a} {rel} {b}", "{rel} {b} there is {a}")
TRAIN = Phrasebook(
    name="train",
    frames={
        ("template", "single"): SINGLE_TEMPLATES,
        ("template", "count"): COUNT_TEMPLATES,
        ("template", "relation"): RELATION_TEMPLATES,
        ("paraphrase", "single"): _TRAIN_SINGLE,
        ("paraphrase", "count"): _TRAIN_COUNT,
        ("paraphrase", "relation"): _TRAIN_RELATION,
        ("digits", "single"): _TRAIN_SINGLE,
        ("digits", "count"): _TRAIN_COUNT,
        ("digits", "relation"): _TRAIN_RELATION,
        ("keywords", "single"): ("{a}, black background", "{a}, minimal, black background", "geometric, {a}"),
        ("keywords", "count"): ("{a}, black background", "{a}, minimal, black background", "geometric, {a}"),
        ("keywords", "relation"): ("{a}, {rel}, {b}", "{a}, {rel}, {b}, black background", "geometric, {a}, {rel}, {b}"),
        ("detailed", "single"): ("one object: {a}{where_a}", "a single object: {a}{where_a}"),
        ("detailed", "count"): ("{n} objects: {a}{where_list}", "{n} identical objects: {a}{where_list}"),
        ("detailed", "relation"): ("two objects: {a}{where_a} and {b}{where_b}; {the_a} is {rel} {the_b}",),
    },
    numbers={
        "template": {1: ("a",), 2: ("two",), 3: ("three",)},
        "paraphrase": {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)},
        "detailed": {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)},
        "keywords": {1: ("",), 2: ("two", "2"), 3: ("three", "3")},
        "digits": {1: ("1",), 2: ("2",), 3: ("3",)},
    },
    sizes={"small": ("small", "tiny", "little"), "large": ("large", "big")},
    relations={
        "left of": ("left of", "to the left of", "on the left side of", "on the left of"),
        "right of": ("right of", "to the right of", "on the right side of", "on the right of"),
        "above": ("above", "over", "higher than"),
        "below": ("below", "under", "beneath", "lower than"),
    },
    positions={"top left": "in the upper left", "top": "near the top", "top right": "in the upper right",
               "left": "near the left edge", "centre": "in the centre", "right": "near the right edge",
               "bottom left": "in the lower left", "bottom": "near the bottom", "bottom right": "in the lower right"},
    definite="the",
)

_EVAL_SINGLE = ("somewhere on the canvas sits {a}", "all that is visible is {a}", "i see {a}",
                "a dark scene containing {a}", "{a} alone on a dark canvas", "please generate {a}",
                "render {a} for me")
_EVAL_COUNT = ("somewhere on the canvas sit {a}", "i see {a}", "a dark scene containing {a}",
               "{a} spread across a dark canvas", "please generate {a}", "render {a} for me")
_EVAL_RELATION = ("i see {a} {rel} {b}", "please generate {a} {rel} {b}", "{a} can be seen {rel} {b}",
                  "a dark scene where {a} lies {rel} {b}", "{rel} {b} you can spot {a}", "render {a} located {rel} {b}")
EVAL = Phrasebook(
    name="eval",
    frames={
        ("paraphrase", "single"): _EVAL_SINGLE,
        ("paraphrase", "count"): _EVAL_COUNT,
        ("paraphrase", "relation"): _EVAL_RELATION,
        ("digits", "single"): _EVAL_SINGLE,
        ("digits", "count"): _EVAL_COUNT,
        ("digits", "relation"): _EVAL_RELATION,
        ("keywords", "single"): ("keywords: {a} / dark canvas", "{a} / plain / dark canvas"),
        ("keywords", "count"): ("keywords: {a} / dark canvas", "{a} / plain / dark canvas"),
        ("keywords", "relation"): ("keywords: {a} / {rel} / {b}", "{a} / {rel} / {b} / dark canvas"),
        ("detailed", "single"): ("described in detail, one item: {a}{where_a}",
                                 "full description, one item: {a}{where_a}"),
        ("detailed", "count"): ("described in detail, {n} items: {a}{where_list}",
                                "full description, {n} items: {a}{where_list}"),
        ("detailed", "relation"): ("described in detail, two items: {a}{where_a} together with {b}{where_b}. "
                                   "{the_a} lies {rel} {the_b}",),
    },
    numbers={
        "paraphrase": {1: ("exactly one", "just one", "only one"), 2: ("a pair of", "exactly two"),
                       3: ("a trio of", "exactly three")},
        "detailed": {1: ("exactly one", "just one"), 2: ("a pair of", "exactly two"), 3: ("a trio of", "exactly three")},
        "keywords": {1: ("", "just one"), 2: ("a pair of", "exactly 2"), 3: ("a trio of", "exactly 3")},
        "digits": {1: ("exactly 1", "just 1"), 2: ("exactly 2", "just 2"), 3: ("exactly 3", "just 3")},
    },
    sizes={"small": ("miniature", "petite"), "large": ("huge", "oversized")},
    relations={
        "left of": ("to the left hand side of", "further left than", "farther left than"),
        "right of": ("to the right hand side of", "further right than", "farther right than"),
        "above": ("further up than", "higher up than", "up above"),
        "below": ("further down than", "lower down than", "underneath"),
    },
    positions={"top left": "toward the top left corner", "top": "toward the top edge",
               "top right": "toward the top right corner", "left": "toward the left border",
               "centre": "around the middle", "right": "toward the right border",
               "bottom left": "toward the bottom left corner", "bottom": "toward the bottom edge",
               "bottom right": "toward the bottom right corner"},
    definite="that",
)
PHRASEBOOKS = {"train": TRAIN, "eval": EVAL}


# ----------------------------------------------------------------------------- what a phrase states


@dataclass
class _Object:
    count: int
    color: str
    shape: str
    size: str | None  # None: not said
    position: str | None = None  # a key of POSITIONS, or None
    positions: list[str] = field(default_factory=list)  # count groups: one per object


def _position(center: tuple[float, float], image_size: int) -> str:
    col = min(2, int(3 * center[0] / image_size))
    row = min(2, int(3 * center[1] / image_size))
    return POSITIONS[3 * row + col]


def _facts_of_scene(scene: Scene, rng: np.random.Generator, always_size: bool) -> tuple[list[_Object], str | None]:
    def size_of(obj) -> str | None:
        return obj.size if always_size or rng.random() < SIZE_WORD_PROB else None

    first = scene.objects[0]
    if scene.kind == "relation":
        objects = [_Object(1, o.color, o.shape, size_of(o), _position(o.center, scene.image_size))
                   for o in scene.objects[:2]]
        return objects, scene.relation
    group = _Object(len(scene.objects), first.color, first.shape, size_of(first))
    group.positions = [_position(o.center, scene.image_size) for o in scene.objects]
    if group.count == 1:
        group.position = group.positions[0]
    return [group], None


def _facts_of_spec(spec: PromptSpec) -> tuple[list[_Object], str | None]:
    shapes_world = (len(spec.objects) == 1 and 1 <= spec.objects[0].count <= 3) or (
        len(spec.objects) == 2 and spec.relation is not None and all(o.count == 1 for o in spec.objects))
    if not shapes_world:  # the phrasebooks word what shapes-world scenes hold, nothing more
        raise ValueError(f"cannot word {spec.text or spec!r}: expected 1-3 identical objects or a relation "
                         "between two single objects")
    objects = [_Object(o.count, o.color, o.shape, o.size) for o in spec.objects]
    if spec.relation is not None:
        for obj, where in zip(objects, RELATION_POSITIONS[spec.relation]):
            obj.position = where
    return objects, spec.relation


def _kind(objects: Sequence[_Object]) -> str:
    if len(objects) == 2:
        return "relation"
    return "count" if objects[0].count > 1 else "single"


# ----------------------------------------------------------------------------- rendering


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_text(obj: _Object, book: Phrasebook, style: str, rng: np.random.Generator) -> str:
    number = _choice(rng, book.numbers[style][obj.count])
    size = _choice(rng, book.sizes[obj.size]) if obj.size else ""
    noun = obj.shape + ("s" if obj.count > 1 else "")
    return " ".join(w for w in (number, size, obj.color, noun) if w)


def _definite_text(obj: _Object, book: Phrasebook) -> str:
    return f"{book.definite} {obj.color} {obj.shape}"


def _where_list(obj: _Object, book: Phrasebook) -> str:
    if not obj.positions:
        return ""
    places = [f"one {book.positions[p]}" for p in obj.positions]
    return ", " + ", ".join(places[:-1]) + " and " + places[-1]


def _template_of_spec(objects: list[_Object], relation: str | None, rng: np.random.Generator) -> str:
    kind = _kind(objects)
    frame = _choice(rng, TRAIN.frames[("template", kind)])
    texts = [_object_text(o, _TEMPLATE_BOOK, "template", rng) for o in objects]
    return frame.format(a=texts[0], b=texts[-1], rel=RELATION_PHRASES.get(relation or "", ""))


def _render(objects: list[_Object], relation: str | None, style: str, book: Phrasebook,
            rng: np.random.Generator) -> str:
    kind = _kind(objects)
    if relation is not None and rng.random() < 0.5:  # "B is right of A" states the same as "A is left of B"
        objects, relation = objects[::-1], INVERSE_RELATION[relation]
    frame = _choice(rng, book.frames[(style, kind)])
    a, b = objects[0], objects[-1]
    slots = {
        "a": _object_text(a, book, style, rng),
        "b": _object_text(b, book, style, rng) if kind == "relation" else "",
        "rel": _choice(rng, book.relations[relation]) if relation else "",
        "n": HEADER_COUNT_WORDS[a.count],
        "the_a": _definite_text(a, book),
        "the_b": _definite_text(b, book),
        "where_a": f" {book.positions[a.position]}" if a.position else "",
        "where_b": f" {book.positions[b.position]}" if b.position else "",
        "where_list": _where_list(a, book) if kind == "count" else "",
    }
    return frame.format(**slots)


def phrase(spec: PromptSpec | Scene, style: str, rng: np.random.Generator, split: str = "train") -> str:
    """The facts of a prompt spec or scene worded in `style`, drawn from the `split` phrasebook only.

    A scene's sizes are said with `shapes.SIZE_WORD_PROB` as in templates (always in "detailed", which also
    gives each object's position); a spec's sizes are said exactly when the spec has them. Relations are
    stated either way round ("A left of B" or "B right of A"). "template" exists only in the train split.
    """
    if style not in STYLES:
        raise ValueError(f"unknown phrasing style {style!r}; expected one of {STYLES}")
    if split not in PHRASEBOOKS:
        raise ValueError(f"unknown phrasebook split {split!r}; expected one of {SPLITS}")
    if style == "template" and split == "eval":
        raise ValueError("style 'template' is the training wording; the eval phrasebook has none")
    if isinstance(spec, Scene):
        if style == "template":
            return caption(spec, rng)
        objects, relation = _facts_of_scene(spec, rng, always_size=style == "detailed")
    elif isinstance(spec, PromptSpec):
        objects, relation = _facts_of_spec(spec)
        if style == "template":
            return _template_of_spec(objects, relation, rng)
    else:
        raise TypeError(f"phrase needs a PromptSpec or a Scene, got {type(spec).__name__}")
    return _render(objects, relation, style, PHRASEBOOKS[split], rng)


def check_style_weights(weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """Style names and their probabilities; ValueError for unknown styles or unusable weights."""
    unknown = set(weights) - set(STYLES)
    if unknown or not weights:
        raise ValueError(f"caption styles must be a non-empty subset of {STYLES}, got {sorted(weights)}")
    names = list(weights)
    p = np.asarray([weights[s] for s in names], dtype=np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"caption style weights must be non-negative with a positive sum, got {dict(weights)}")
    return names, p / p.sum()


def diversified_caption(scene: Scene, rng: np.random.Generator,
                        style_weights: Mapping[str, float] | None = None) -> str:
    """A training caption in a style drawn from `style_weights` (default `DEFAULT_STYLE_WEIGHTS`), TRAIN phrasebook."""
    names, p = check_style_weights(style_weights or DEFAULT_STYLE_WEIGHTS)
    style = names[int(rng.choice(len(names), p=p))]
    return phrase(scene, style, rng, "train")



# ----------------------------------------------------------------------------- evaluation prompts


@dataclass
class EvalPrompt:
    template: str  # `shapes.canonical_prompt` of the spec, as `make_prompts` gives it
    text: str  # the same facts in a held-out wording
    style: str
    spec: PromptSpec


def eval_prompts(kind: str, n: int, seed: int = 0, styles: Sequence[str] = EVAL_STYLES) -> list[EvalPrompt]:
    """`n` specs of one kind drawn exactly as `shapes.make_prompts` draws them, each worded twice:
    as its template and in a style drawn uniformly from `styles` with the EVAL phrasebook."""
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {KINDS}")
    bad = [s for s in styles if s not in EVAL_STYLES]
    if bad or not styles:
        raise ValueError(f"eval styles must be a non-empty subset of {EVAL_STYLES}, got {list(styles)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind), 1]))
    out = []
    for spec in make_prompt_specs(kind, n, seed):
        style = _choice(rng, list(styles))
        text = phrase(spec, style, rng, "eval")
        stated = PromptSpec([ObjectSpec(o.count, o.color, o.shape, o.size) for o in spec.objects], spec.relation,
                            spec.kind, text)
        out.append(EvalPrompt(canonical_prompt(spec), text, style, stated))
    return out


def paraphrase_prompts(kind: str, n: int, seed: int = 0) -> list[tuple[str, PromptSpec]]:
    """`n` held-out (EVAL phrasebook) prompts of one kind, each with the PromptSpec it states."""
    return [(p.text, p.spec) for p in eval_prompts(kind, n, seed)]


def template_twins(kind: str, n: int, seed: int = 0) -> list[tuple[str, str, PromptSpec]]:
    """(template text, held-out paraphrase, spec) triples: the template is `make_prompts(kind, n, seed)[i]`."""
    return [(p.template, p.text, p.spec) for p in eval_prompts(kind, n, seed)]


# ----------------------------------------------------------------------------- grammar of a phrasebook


_TEMPLATE_BOOK = Phrasebook("template", {}, {"template": TRAIN.numbers["template"]},
                            {"small": ("small",), "large": ("large",)}, {r: (p,) for r, p in RELATION_PHRASES.items()},
                            {})


def _alt(words) -> str:
    return "(?:" + "|".join(sorted((re.escape(w) for w in set(words)), key=len, reverse=True)) + ")"


def _object_pattern(book: Phrasebook, style: str) -> str:
    numbers = [w for ws in book.numbers[style].values() for w in ws if w]
    optional_number = "" in {w for ws in book.numbers[style].values() for w in ws}
    number = f"(?:{_alt(numbers)} )" + ("?" if optional_number else "")
    sizes = f"(?:{_alt(w for ws in book.sizes.values() for w in ws)} )?"
    return f"{number}{sizes}{_alt(COLORS)} {_alt(SHAPES)}s?"


@lru_cache(maxsize=None)
def grammar(split: str) -> re.Pattern:
    """A regex matching every string `phrase(..., split=split)` can produce (and a few more)."""
    book = PHRASEBOOKS[split]
    definite = f"{re.escape(book.definite)} {_alt(COLORS)} {_alt(SHAPES)}"
    position = _alt(book.positions.values())
    alternatives = []
    for (style, _kind_name), frames in book.frames.items():
        wording = _TEMPLATE_BOOK if style == "template" else book
        obj = _object_pattern(wording, style)
        slots = {
            "a": obj, "b": obj, "rel": _alt(w for ws in wording.relations.values() for w in ws),
            "n": _alt(HEADER_COUNT_WORDS.values()), "the_a": definite, "the_b": definite,
            "where_a": f"(?: {position})?", "where_b": f"(?: {position})?",
            "where_list": f"(?:, one {position}(?:, one {position})* and one {position})?",
        }
        for frame in frames:
            parts = re.split(r"(\{[a-z_]+\})", frame)
            alternatives.append("".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts))
    return re.compile("^(?:" + "|".join(alternatives) + ")$")


def could_produce(text: str, split: str) -> bool:
    """Whether the `split` phrasebook's grammar can make exactly this text."""
    return grammar(split).match(text) is not None

