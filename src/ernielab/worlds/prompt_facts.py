"""Read the facts a free-text shapes-world prompt states, in any wording, and compare two prompts.

A rule-based reader (no model) for every wording the project makes: the training templates
(`shapes.caption`), both phrasebooks of `worlds.phrasing` (paraphrases, detailed descriptions, keyword lists,
digits) and the prompt enhancer's short intents ("something red", "some circles", "a circle and a square").

It finds *object mentions* ([number] [size] [colour] noun, or "something [colour]") and *relation phrases*
("left of", "to the left hand side of", "further up than", "beneath", ...) in the text:

- a number is a word or digit ("a", "a single", "exactly one", "a pair of", "3"); a plural noun without one
  says "two or more"; a singular noun says one;
- a mention that ends with ":" after a vague noun ("two objects:") is a header, not an object;
- a definite mention ("the red circle", "that red circle") of an object already mentioned is that object;
- the relation's subject is the mention right before the phrase, its object the one right after; a phrase that
  opens its clause ("to the left of a green triangle there is a red circle") has its subject after its object.

`contradictions(prompt, rewrite)` lists what a rewrite changes or drops of the prompt's facts; what the prompt
leaves unsaid (a colour, a size, an exact count after "some") the rewrite may add freely.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ernielab.worlds.shapes import COLORS, INVERSE_RELATION, SHAPES, PromptSpec

_COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "1": 1, "2": 2, "3": 3, "4": 4,
                "5": 5, "6": 6, "a single": 1, "single": 1, "a pair of": 2, "a couple of": 2, "a trio of": 3,
                "a": 1, "an": 1}
_QUALIFIERS = ("exactly", "just", "only")
VAGUE_AMOUNTS = ("some", "several", "a few", "multiple", "many")
SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "miniature": "small", "petite": "small",
              "smallish": "small", "large": "large", "big": "large", "huge": "large", "oversized": "large",
              "sizeable": "large"}
COLOR_WORDS = {**{c: c for c in COLORS}, "violet": "purple", "turquoise": "cyan"}
VAGUE_NOUNS = ("shape", "thing", "object", "item")
DEFINITE = ("the", "that", "this")
RELATION_KEYS = {"left": "left of", "right": "right of", "up": "above", "down": "below"}
_VERTICAL = {"above": "above", "over": "above", "atop": "above", "on top of": "above", "higher than": "above",
             "up above": "above", "below": "below", "under": "below", "beneath": "below", "underneath": "below",
             "lower than": "below"}
_NOT_A_PLACE = r"(?!\s+the\s+(?:image|picture|canvas|frame|scene|photo))"


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_NUMBER = rf"(?:(?:{_alt(_QUALIFIERS)})\s+)?(?:{_alt(_COUNT_WORDS)}|{_alt(VAGUE_AMOUNTS)})"
_MENTION_RE = re.compile(
    rf"\b(?:(?P<something>something)(?:\s+(?P<scolor>{_alt(COLOR_WORDS)}))?"
    rf"|(?P<det>(?:{_alt(DEFINITE)})\s+)?(?:(?P<num>{_NUMBER})\s+)?(?P<mods>(?:(?:{_alt(SIZE_WORDS)}|{_alt(COLOR_WORDS)})\s+)*)"
    rf"(?P<noun>{_alt(SHAPES + VAGUE_NOUNS)})(?P<plural>e?s)?)\b(?P<header>\s*:)?"
)
_RELATION_RE = re.compile(
    rf"\b(?:(?:(?:to|on|at)\s+the\s+)?(?P<side>left|right)(?:\s+hand)?(?:\s+side)?\s+of\b{_NOT_A_PLACE}"
    rf"|(?:further|farther|more)\s+(?:to\s+the\s+)?(?P<cmp>left|right|up|down)\s+than"
    rf"|(?:higher\s+up|lower\s+down)\s+than"
    rf"|(?P<vert>{_alt(_VERTICAL)}))\b"
)
_CLAUSE_END = re.compile(r"[.;:!?]")


@dataclass
class ObjectFacts:
    count: int | None = 1  # None: a plural without an exact number ("some circles"): two or more
    color: str | None = None  # None: not said
    shape: str | None = None
    size: str | None = None

    def describe(self) -> str:
        number = "some" if self.count is None else str(self.count)
        words = [number, self.size, self.color, self.shape or "object"]
        return " ".join(w for w in words if w)


@dataclass
class PromptFacts:
    objects: list[ObjectFacts] = field(default_factory=list)
    relation: str | None = None  # objects[0] REL objects[1]

    def normalised(self) -> "PromptFacts":
        """The same facts with "right of" / "below" turned into "left of" / "above" (objects swapped)."""
        if self.relation in ("right of", "below") and len(self.objects) == 2:
            return PromptFacts(self.objects[::-1], INVERSE_RELATION[self.relation])
        return PromptFacts(list(self.objects), self.relation)

    def same_as(self, other: "PromptFacts") -> bool:
        return self.normalised() == other.normalised()


def facts_of_spec(spec: PromptSpec) -> PromptFacts:
    """What a PromptSpec states, as PromptFacts."""
    return PromptFacts([ObjectFacts(o.count, o.color, o.shape, o.size) for o in spec.objects], spec.relation)


# ----------------------------------------------------------------------------- reading


@dataclass
class _Mention:
    start: int
    end: int
    facts: ObjectFacts
    definite: bool


def normalise_text(text: str) -> str:
    text = text.lower().replace("-", " ").replace("(", " ").replace(")", " ")
    text = re.sub(r"\s*([,;:.!?/|+])\s*", r" \1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def _count_of(number: str | None, plural: bool) -> int | None:
    if number is None:
        return None if plural else 1
    number = re.sub(rf"^(?:{_alt(_QUALIFIERS)})\s+", "", number)
    if number in VAGUE_AMOUNTS:
        return None
    return _COUNT_WORDS[number]


def _mention(m: re.Match) -> _Mention | None:
    if m.group("something"):
        color = m.group("scolor")
        return _Mention(m.start(), m.end(), ObjectFacts(1, COLOR_WORDS.get(color or ""), None, None), False)
    noun = m.group("noun")
    if m.group("header") and noun in VAGUE_NOUNS and not m.group("mods"):
        return None  # "two objects:" announces what follows
    words = (m.group("mods") or "").split()
    colors = [COLOR_WORDS[w] for w in words if w in COLOR_WORDS]
    sizes = [SIZE_WORDS[w] for w in words if w in SIZE_WORDS]
    facts = ObjectFacts(
        _count_of(m.group("num"), bool(m.group("plural"))),
        colors[-1] if colors else None,
        noun if noun in SHAPES else None,
        sizes[-1] if sizes else None,
    )
    return _Mention(m.start(), m.end(), facts, bool(m.group("det")))


def _relation_of(m: re.Match) -> str:
    if m.group("side"):
        return RELATION_KEYS[m.group("side")]
    if m.group("cmp"):
        return RELATION_KEYS[m.group("cmp")]
    if m.group("vert"):
        return _VERTICAL[m.group("vert")]
    return "above" if m.group(0).startswith("higher") else "below"


def _same_object(mention: ObjectFacts, known: ObjectFacts) -> bool:
    return all(getattr(mention, a) in (None, getattr(known, a)) for a in ("color", "shape", "size"))


def _resolve(mentions: list[_Mention]) -> tuple[list[ObjectFacts], list[int]]:
    """Objects (in order of first mention) and, for each mention, the object it names."""
    objects: list[ObjectFacts] = []
    owner = []
    for m in mentions:
        match = next((i for i, o in enumerate(objects) if m.definite and _same_object(m.facts, o)), None)
        if match is None:
            objects.append(m.facts)
            match = len(objects) - 1
        owner.append(match)
    return objects, owner


def _clause_start(text: str, pos: int) -> int:
    ends = [m.end() for m in _CLAUSE_END.finditer(text, 0, pos)]
    return ends[-1] if ends else 0


def extract_facts(text: str) -> PromptFacts:
    """The objects (count, colour, shape, size; None where unsaid) and the relation a prompt states.

    The relation's subject is `objects[0]`. A text with no recognisable object gives no objects.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a prompt string, got {type(text).__name__}")
    norm = normalise_text(text)
    relations = list(_RELATION_RE.finditer(norm))
    taken = [(r.start(), r.end()) for r in relations]
    mentions = [x for x in (_mention(m) for m in _MENTION_RE.finditer(norm)) if x is not None
                and not any(s <= x.start < e for s, e in taken)]
    objects, owner = _resolve(mentions)
    for r in relations:
        pair = _relation_pair(norm, r, mentions, owner)
        if pair is not None and pair[0] != pair[1]:
            subject, obj = pair
            rest = [o for i, o in enumerate(objects) if i not in pair]
            return PromptFacts([objects[subject], objects[obj], *rest], _relation_of(r))
    return PromptFacts(objects, None)


def _relation_pair(norm: str, r: re.Match, mentions: list[_Mention], owner: list[int]) -> tuple[int, int] | None:
    before = [i for i, m in enumerate(mentions) if m.end <= r.start()]
    after = [i for i, m in enumerate(mentions) if m.start >= r.end()]
    if not after:
        return None
    clause = _clause_start(norm, r.start())
    if not any(mentions[i].start >= clause for i in before) and len(after) >= 2:
        return owner[after[1]], owner[after[0]]  # "left of B ... A": the subject comes after
    if not before:
        return None
    return owner[before[-1]], owner[after[0]]


# ----------------------------------------------------------------------------- comparing


def _object_reasons(want: ObjectFacts, got: ObjectFacts, which: str) -> list[str]:
    reasons = []
    for attr in ("color", "shape", "size"):
        said = getattr(want, attr)
        if said is not None and getattr(got, attr) != said:
            now = getattr(got, attr) or "unsaid"
            reasons.append(f"{which}: {attr} {said} became {now}")
    if want.count is not None and got.count != want.count:
        reasons.append(f"{which}: count {want.count} became {'some' if got.count is None else got.count}")
    if want.count is None and got.count is not None and got.count < 2:
        reasons.append(f"{which}: several became {got.count}")
    return reasons


def _pair_reasons(want: PromptFacts, got: PromptFacts, order: tuple[int, int]) -> list[str]:
    a, b = (got.objects[i] for i in order)
    reasons = _object_reasons(want.objects[0], a, "first object") + _object_reasons(want.objects[1], b, "second object")
    if want.relation is not None:
        got_relation = got.relation if order == (0, 1) else INVERSE_RELATION.get(got.relation or "")
        if got_relation != want.relation:
            said = f"{want.objects[0].describe()} {want.relation} {want.objects[1].describe()}"
            now = f"{a.describe()} {got_relation} {b.describe()}" if got_relation else "no relation"
            reasons.append(f"relation: prompt says {said}, rewrite says {now}")
    return reasons


def contradictions(prompt: str, rewrite: str) -> list[str]:
    """Reasons the rewrite does not keep every fact the prompt states (empty: it keeps them all).

    Facts the prompt leaves unsaid may be added. For two objects either order of the rewrite is tried (the
    relation flips with it) and the one with fewer reasons is reported.
    """
    want, got = extract_facts(prompt), extract_facts(rewrite)
    if not want.objects:
        return []  # nothing stated, nothing to keep
    if not got.objects:
        return ["rewrite states no shapes-world object"]
    if len(got.objects) != len(want.objects):
        return [f"prompt states {len(want.objects)} object group(s), rewrite {len(got.objects)}"]
    if len(want.objects) == 1:
        return _object_reasons(want.objects[0], got.objects[0], "object")
    return min((_pair_reasons(want, got, (0, 1)), _pair_reasons(want, got, (1, 0))), key=len)
