"""Short, underspecified intents for shapes world, paired with full captions that agree with them.

An *intent* is what a user might type: "a red thing", "three shapes", "a blue shape left of something".
It is made from a shapes-world scene by dropping attributes at random (colour, shape, size, exact
count, relation) or saying them vaguely ("something red", "some circles", "a circle and a square").
Its *target* is a full caption of the same scene in the training-caption style, so the pair is
consistent by construction; a prompt enhancer learns intent -> target.

Grammar of an intent (lower case, parsed by `parse_intent`):

    [prefix] OBJECT [RELATION OBJECT] [suffix]
    OBJECT   = [number] [size] [colour] noun  |  something [colour]
    number   = a | an | one | two | three | some | several | a few | multiple   (plural noun alone: "some")
    noun     = circle | square | triangle | shape | thing | object   (+ plural s)
    RELATION = left of | to the right of | above | below | ...  (as in captions)  |  and | next to | with

Checking (`check_intent`) scores a generated image against the attributes the intent specifies and
nothing else; `caption_consistent` tells whether a full caption is a valid shapes-world caption that
agrees with every attribute of an intent.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ernielab.core.config import Config
from ernielab.worlds.shapes import (
    _NUMBERS,
    _PREFIX,
    _REL,
    _RELATION_ALIASES,
    _SIZE_ALIASES,
    _SUFFIX,
    COLORS,
    COUNT_TEMPLATES,
    INVERSE_RELATION,
    NUMBER_WORDS,
    RELATION_PHRASES,
    RELATION_TEMPLATES,
    SHAPES,
    SINGLE_TEMPLATES,
    SIZE_WORD_PROB,
    Scene,
    ShapeObject,
    _alt,
    object_phrase,
    parse_prompt,
    sample_item_scene,
)

VAGUE_NOUNS = ("shape", "thing", "object")
VAGUE_PLURAL_NUMBERS = ("some", "several", "a few", "multiple")
VAGUE_RELATIONS = ("and", "next to", "with")
MAX_COUNT = 3  # shapes-world count scenes hold 2 or 3 objects
INTENT_ATTRIBUTES = ("color", "shape", "count", "relation", "all")


@dataclass
class IntentObject:
    color: str | None = None  # None: not said
    shape: str | None = None
    count: int | None = 1  # None: a vague plural ("some circles"), i.e. 2 or more
    size: str | None = None

    def accepts(self, color: str, shape: str) -> bool:
        return (self.color is None or self.color == color) and (self.shape is None or self.shape == shape)


@dataclass
class IntentSpec:
    objects: list[IntentObject]
    relation: str | None = None  # object 0 REL object 1; None: unsaid (or a single object group)
    text: str = ""

    @property
    def kind(self) -> str:
        if len(self.objects) == 2:
            return "relation"
        return "single" if self.objects[0].count == 1 else "count"

    def complete(self) -> bool:
        """Says everything a caption must say (size aside): colours, shapes, exact counts, the relation."""
        objects_said = all(o.color and o.shape and o.count for o in self.objects)
        return objects_said and (len(self.objects) == 1 or self.relation is not None)

    def specifies(self) -> set[str]:
        """Attributes the intent pins down (count is always said, if only as "a" or "some")."""
        out = {"count"}
        if any(o.color for o in self.objects):
            out.add("color")
        if any(o.shape for o in self.objects):
            out.add("shape")
        if any(o.size for o in self.objects):
            out.add("size")
        if self.relation:
            out.add("relation")
        return out


# ----------------------------------------------------------------------------- parsing

_INTENT_NUMBERS = {**_NUMBERS, **{w: None for w in VAGUE_PLURAL_NUMBERS}}
_NOUNS = SHAPES + VAGUE_NOUNS
_INTENT_OBJ = (
    r"(?:something(?:\s+(?P<scolor{i}>" + _alt(COLORS) + r"))?"
    rf"|(?:(?P<num{{i}}>{_alt(_INTENT_NUMBERS)})\s+)?(?:(?P<size{{i}}>{_alt(_SIZE_ALIASES)})\s+)?"
    rf"(?:(?P<color{{i}}>{_alt(COLORS)})\s+)?(?P<noun{{i}}>{_alt(_NOUNS)})(?P<plural{{i}}>e?s)?)"
)
_INTENT_REL = rf"(?:{_REL}|(?P<vague>{_alt(VAGUE_RELATIONS)}))"
_INTENT_RE = re.compile(
    rf"^{_PREFIX}{_INTENT_OBJ.format(i=0)}(?:\s+{_INTENT_REL}\s+{_INTENT_OBJ.format(i=1)})?{_SUFFIX}$"
)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!").strip().replace(",", "")


def _parse_object(m: re.Match, i: int, text: str) -> IntentObject | None:
    if m.group(f"noun{i}") is None:  # "something [colour]" or an absent second object
        color = m.group(f"scolor{i}")
        return IntentObject(color=color) if color or _said_something(m, i) else None
    noun, number, plural = m.group(f"noun{i}"), m.group(f"num{i}"), bool(m.group(f"plural{i}"))
    if number is not None and _INTENT_NUMBERS[number] is None and not plural:
        raise ValueError(f"not a shapes-world intent: {text!r} ({number!r} needs a plural noun)")
    count = _INTENT_NUMBERS[number] if number else (None if plural else 1)
    if count is not None and (count > 1) != plural:
        raise ValueError(f"not a shapes-world intent: {text!r} (number and noun disagree)")
    shape = noun if noun in SHAPES else None
    return IntentObject(m.group(f"color{i}"), shape, count, _SIZE_ALIASES.get(m.group(f"size{i}") or ""))


def _said_something(m: re.Match, i: int) -> bool:
    """Group i matched the bare word "something" (its span is set even without a colour)."""
    return i == 0 or m.group("side") is not None or m.group("vert") is not None or m.group("vague") is not None


def parse_intent(text: str) -> IntentSpec:
    """Parse an intent (any full caption is an intent too); text outside the grammar raises `ValueError`."""
    if not isinstance(text, str):
        raise ValueError(f"not a shapes-world intent: expected a string, got {type(text).__name__}")
    m = _INTENT_RE.match(_normalise(text))
    if m is None:
        raise ValueError(f"not a shapes-world intent: {text!r}")
    objects = [o for o in (_parse_object(m, i, text) for i in range(2)) if o is not None]
    relation = None
    if len(objects) == 2 and (m.group("side") or m.group("vert")):
        relation = _RELATION_ALIASES[m.group("side") or m.group("vert")]
    if len(objects) == 2 and any(o.count != 1 for o in objects):
        raise ValueError(f"not a shapes-world intent: {text!r} (two object groups must be single objects)")
    return IntentSpec(objects, relation, text)


# ----------------------------------------------------------------------------- consistency of a caption


def parse_caption(text: str) -> IntentSpec:
    """A full shapes-world caption as an `IntentSpec`; raises `ValueError` unless it could describe a scene.

    Beyond `parse_prompt`'s grammar: one object, 2-3 identical objects, or two *different* objects.
    """
    spec = parse_prompt(text)
    objects = [IntentObject(o.color, o.shape, o.count, o.size) for o in spec.objects]
    if len(objects) == 1 and not 1 <= objects[0].count <= MAX_COUNT:
        raise ValueError(f"not a shapes-world caption: {text!r} (count {objects[0].count} > {MAX_COUNT})")
    if len(objects) == 2:
        a, b = objects
        if a.count != 1 or b.count != 1 or (a.color, a.shape) == (b.color, b.shape):
            raise ValueError(f"not a shapes-world caption: {text!r} (a relation needs two different single objects)")
    return IntentSpec(objects, spec.relation, text)


def _object_agrees(want: IntentObject, got: IntentObject) -> bool:
    count_ok = got.count >= 2 if want.count is None else got.count == want.count
    size_ok = want.size is None or want.size == got.size
    return count_ok and size_ok and want.accepts(got.color, got.shape)


def caption_consistent(intent: IntentSpec | str, caption_text: str) -> bool:
    """The caption parses as a valid shapes-world caption and agrees with every attribute the intent says.

    A one-group intent needs a one-group caption; for two objects either order works, the relation
    flipping with it ("a circle above a square" agrees with "a blue square below a red circle").
    """
    want = parse_intent(intent) if isinstance(intent, str) else intent
    try:
        got = parse_caption(caption_text)
    except ValueError:
        return False
    if len(want.objects) != len(got.objects):
        return False
    if len(want.objects) == 1:
        return _object_agrees(want.objects[0], got.objects[0])
    (a, b), (x, y) = want.objects, got.objects
    straight = _object_agrees(a, x) and _object_agrees(b, y) and want.relation in (None, got.relation)
    flipped = (_object_agrees(a, y) and _object_agrees(b, x)
               and want.relation in (None, INVERSE_RELATION.get(got.relation)))
    return straight or flipped


# ----------------------------------------------------------------------------- checking images


def check_intent(intent: IntentSpec | str, image: Any = None, detections: list | None = None) -> dict[str, bool | None]:
    """Score one image against the attributes the intent specifies (None: not specified).

    - color: every said colour is detected;
    - shape: every object whose shape is said is detected with it (and its colour, if said);
    - count: the number of detections is the number asked for (2 or more for "some"), and they can be
      assigned to the intent's objects (distinct detections for two objects);
    - relation: two distinct detections matching the two objects satisfy the relation (centroids, as in
      `eval.alignment.relation_satisfied`);
    - all: every specified attribute holds.
    """
    from ernielab.worlds.alignment import detect, relation_satisfied

    spec = parse_intent(intent) if isinstance(intent, str) else intent
    dets = detect(image) if detections is None else detections
    colors = {d.color for d in dets}
    said = spec.specifies()
    result: dict[str, bool | None] = {
        "color": all(o.color in colors for o in spec.objects if o.color) if "color" in said else None,
        "shape": all(any(o.accepts(d.color, d.shape) for d in dets) for o in spec.objects if o.shape)
        if "shape" in said else None,
        "count": _count_ok(spec, dets),
        "relation": None,
    }
    if spec.relation:
        a, b = spec.objects
        result["relation"] = any(
            relation_satisfied(da.center, db.center, spec.relation)
            for da in dets if a.accepts(da.color, da.shape)
            for db in dets if db is not da and b.accepts(db.color, db.shape)
        )
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def _count_ok(spec: IntentSpec, dets: Sequence) -> bool:
    if len(spec.objects) == 1:
        obj = spec.objects[0]
        right_number = len(dets) >= 2 if obj.count is None else len(dets) == obj.count
        return right_number and all(obj.accepts(d.color, d.shape) for d in dets)
    a, b = spec.objects
    return len(dets) == 2 and (
        (a.accepts(dets[0].color, dets[0].shape) and b.accepts(dets[1].color, dets[1].shape))
        or (a.accepts(dets[1].color, dets[1].shape) and b.accepts(dets[0].color, dets[0].shape))
    )


def well_formed_scene(detections: Sequence) -> bool:
    """The detections could be a shapes-world scene: one object, 2-3 identical ones, or two different ones."""
    kinds = {(d.color, d.shape) for d in detections}
    n = len(detections)
    return n in (1, 2) or (n == MAX_COUNT and len(kinds) == 1)


# ----------------------------------------------------------------------------- making intents


@dataclass
class IntentConfig(Config):
    keep_color: float = 0.5  # probability that an object's colour is said
    keep_shape: float = 0.5
    keep_size: float = 0.15
    keep_count: float = 0.5  # count scenes: exact number said, else "some"/"several"/bare plural
    keep_relation: float = 0.6  # relation scenes: the relation said, else "and"/"next to"/"with"
    vague_phrasing: float = 0.5  # colour without shape: "something red" instead of "a red thing"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _intent_object(obj: ShapeObject, count: int, rng: np.random.Generator, cfg: IntentConfig) -> tuple[str, IntentObject]:
    color = obj.color if rng.random() < cfg.keep_color else None
    shape = obj.shape if rng.random() < cfg.keep_shape else None
    size = obj.size if rng.random() < cfg.keep_size else None
    exact = count == 1 or rng.random() < cfg.keep_count
    if count == 1 and shape is None and size is None and rng.random() < cfg.vague_phrasing:
        return ("something" + (f" {color}" if color else "")), IntentObject(color, None, 1, None)
    noun = shape or VAGUE_NOUNS[int(rng.integers(len(VAGUE_NOUNS)))]
    words = [w for w in (size, color, noun + ("s" if count > 1 else "")) if w]
    if count == 1:
        number = _article(words[0])
    elif exact:
        number = NUMBER_WORDS[count]
    else:
        number = (VAGUE_PLURAL_NUMBERS + ("",))[int(rng.integers(len(VAGUE_PLURAL_NUMBERS) + 1))]
    text = " ".join(w for w in [number, *words] if w)
    return text, IntentObject(color, shape, count if exact else None, size)


def make_intent(scene: Scene, rng: np.random.Generator, cfg: IntentConfig | None = None) -> tuple[str, IntentSpec]:
    """A random intent the scene satisfies, and what it says."""
    cfg = cfg or IntentConfig()
    if scene.kind in ("single", "count"):
        text, obj = _intent_object(scene.objects[0], len(scene.objects), rng, cfg)
        return text, IntentSpec([obj], None, text)
    (ta, a), (tb, b) = (_intent_object(o, 1, rng, cfg) for o in scene.objects[:2])
    if rng.random() < cfg.keep_relation:
        relation = scene.relation
        words = RELATION_PHRASES[relation] if rng.random() < 0.5 else relation
    else:
        relation, words = None, VAGUE_RELATIONS[int(rng.integers(len(VAGUE_RELATIONS)))]
    text = f"{ta} {words} {tb}"
    return text, IntentSpec([a, b], relation, text)


def full_caption(scene: Scene, rng: np.random.Generator, intent: IntentSpec | None = None) -> str:
    """A training-style caption of the scene; sizes the intent says are always kept, object order follows the scene."""
    said_size = [bool(o.size) for o in intent.objects] if intent else [False] * 2

    def phrase(i: int, count: int = 1) -> str:
        obj = scene.objects[i]
        size = obj.size if (said_size[min(i, len(said_size) - 1)] or rng.random() < SIZE_WORD_PROB) else None
        return object_phrase(obj.color, obj.shape, count, size)

    if scene.kind == "single":
        return SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))].format(a=phrase(0))
    if scene.kind == "count":
        return COUNT_TEMPLATES[int(rng.integers(len(COUNT_TEMPLATES)))].format(a=phrase(0, len(scene.objects)))
    template = RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))]
    return template.format(a=phrase(0), rel=RELATION_PHRASES[scene.relation], b=phrase(1))


@dataclass
class IntentPair:
    intent: str
    target: str
    kind: str  # scene kind
    spec: IntentSpec


def intent_pair(seed: int, split: str, index: int, kinds: Sequence[str] | None = None,
                cfg: IntentConfig | None = None, image_size: int = 32) -> IntentPair:
    """Pair `index` of a split: deterministic in (seed, split, index); splits reuse shapes-world's disjoint scenes."""
    scene, rng = sample_item_scene(seed, split, index, image_size, kinds)
    text, spec = make_intent(scene, rng, cfg)
    return IntentPair(text, full_caption(scene, rng, spec), scene.kind, spec)


def paraphrase_pair(seed: int, split: str, index: int, styles: Sequence[str], kinds: Sequence[str] | None = None,
                    image_size: int = 32) -> IntentPair:
    """Pair `index` of a split whose input states the whole scene in one of `styles` of `worlds.phrasing`, from its
    train phrasebook only (the eval phrasebook's wordings stay unseen), and whose target is a full caption keeping
    every stated fact (`worlds.prompt_facts.contradictions` finds none). Scene `index` is intent pair `index`'s."""
    from ernielab.worlds.phrasing import phrase
    from ernielab.worlds.prompt_facts import contradictions

    scene, rng = sample_item_scene(seed, split, index, image_size, kinds)
    text = phrase(scene, styles[int(rng.integers(len(styles)))], rng, split="train")
    target = full_caption(scene, rng)
    if contradictions(text, target):  # the wording said a size the caption left out: say every size
        sized = IntentSpec([IntentObject(size=o.size) for o in scene.objects[:2]])
        target = full_caption(scene, rng, sized)
    reasons = contradictions(text, target)
    if reasons:
        raise ValueError(f"no caption keeps the facts of {text!r}: {target!r} ({'; '.join(reasons)})")
    spec = IntentSpec([IntentObject(o.color, o.shape, len(scene.objects) if scene.kind == "count" else 1)
                       for o in scene.objects[:1 if scene.kind != "relation" else 2]], scene.relation, text)
    return IntentPair(text, target, scene.kind, spec)


_SYLLABLES = tuple(c + v for c in "bdfgkmnprstvz" for v in "aeiou")


@functools.lru_cache(maxsize=1)
def _phrasebook_words() -> frozenset[str]:
    from ernielab.worlds.phrasing import PHRASEBOOKS

    texts = [w for book in PHRASEBOOKS.values() for ws in book.wordings().values() for w in ws]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", t))


def nonsense_word(rng: np.random.Generator) -> str:
    """A made-up word of 2-3 syllables ("zuleka"), never a word of a phrasebook (e.g. the eval one's "petite")."""
    while True:
        word = "".join(_SYLLABLES[int(i)] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
        if word not in _phrasebook_words():
            return word


def with_nonsense_words(text: str, rng: np.random.Generator, n_words: int) -> str:
    """`text` with `n_words` made-up words put between its words, where they leave every fact it states as it was
    (`worlds.prompt_facts.extract_facts`); an enhancer trained on such inputs learns that words it does not know
    say nothing, instead of reading them as some colour or count."""
    from ernielab.worlds.prompt_facts import extract_facts

    facts = extract_facts(text)
    for _ in range(n_words):
        words = text.split(" ")
        for _try in range(4):
            at = int(rng.integers(len(words) + 1))
            candidate = " ".join([*words[:at], nonsense_word(rng), *words[at:]])
            if extract_facts(candidate) == facts:
                text = candidate
                break
    return text


def make_intents(kind: str, n: int, seed: int = 0, split: str = "test") -> list[IntentPair]:
    """`n` evaluation pairs whose scenes are all of one kind (single, count or relation)."""
    return [intent_pair(seed, split, i, [kind]) for i in range(n)]
