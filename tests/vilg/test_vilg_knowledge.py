import math

import pytest
import torch
import torch.nn.functional as F

from ernielab.core.layers.attention import SelfAttention
from ernielab.core.layers.rope import rope_angles
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.vilg.knowledge import (
    LexiconTagger,
    Word,
    box_mask,
    enrich_caption,
    insert_pos_markers,
    key_token_mask,
    key_words,
    keyword_attention_bias,
    region_weights,
)


def test_attention_bias_multiplies_key_word_weights_then_renormalises():
    torch.manual_seed(0)
    B, n_img, T, dim, heads, w = 2, 6, 5, 32, 4, 0.3
    attn = SelfAttention(dim, heads)
    x = torch.randn(B, n_img + T, dim)
    lens = torch.tensor([5, 3])
    rope = rope_angles(ErnieImageTransformer.position_ids(B, 2, 3, T, lens), (2, 2, 4), 256)
    mask = ErnieImageTransformer.key_mask(n_img, T, lens)
    key = torch.tensor([[False, True, False, True, True], [True, False, True, False, False]])
    got = attn(x, rope=rope, mask=mask, attn_bias=keyword_attention_bias(key, n_img, w))

    # explicit: softmax attention, multiply (image query, key-word key) weights by 1 + w, renormalise
    q, k, v = attn.qkv(x, rope)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    factor = torch.ones(B, 1, n_img + T, n_img + T)
    factor[:, 0, :n_img, n_img:] += w * key[:, None, :].float()
    p = p * factor
    p = p / p.sum(-1, keepdim=True)
    want = attn.to_out((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - attn(x, rope=rope, mask=mask)).abs().max() > 1e-4  # the bias does something
    # samples switched off get no bias at all
    off = keyword_attention_bias(key, n_img, w, apply=torch.tensor([True, False]))
    assert off[1].abs().sum() == 0 and off[0].abs().sum() > 0


def test_lexicon_key_words_and_token_positions(text_encoder):
    tagger = LexiconTagger()
    caption = "a photo of three small yellow triangles"
    words = key_words(caption, tagger)
    assert [w.text for w in words] == ["photo", "three", "small", "yellow", "triangles"]
    mask = key_token_mask(text_encoder.tokenizer, caption, words)
    ids = text_encoder.tokenizer(caption)["input_ids"]
    assert len(mask) == len(ids) == text_encoder([caption])[1].item()  # aligned with the encoded sequence
    picked = text_encoder.tokenizer.decode([i for i, m in zip(ids, mask.tolist()) if m])
    assert picked.split() == ["photo", "three", "small", "yellow", "triangles"]
    assert not mask[0] and not mask[-1]  # [CLS], [SEP]
    assert key_token_mask(text_encoder.tokenizer, "", []).sum() == 0


def test_spacy_tagger_when_installed():
    pytest.importorskip("spacy")
    from ernielab.vilg.knowledge import SpacyTagger

    try:
        tagger = SpacyTagger()
    except OSError:
        pytest.skip("no spaCy English model installed")
    words = key_words("there are two purple circles to the left of a blue square", tagger)
    texts = {w.text for w in words}
    assert {"two", "purple", "circles", "blue", "square"} <= texts
    assert not texts & {"are", "to", "of", "a"}


def test_pos_markers_keep_spans_on_their_words():
    caption = "a red circle above two blue squares"
    words = key_words(caption, LexiconTagger())
    marked, moved = insert_pos_markers(caption, words)
    assert marked == "a [adj] red [noun] circle above [num] two [adj] blue [noun] squares"
    assert [marked[w.start : w.end] for w in moved] == [w.text for w in words]


def test_region_weights_cover_exactly_the_boxes():
    boxes = torch.tensor([[3.0, 5.0, 13.0, 15.0], [20.0, 1.0, 31.0, 9.0]])
    pixel = torch.zeros(32, 32, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.long().tolist():
        pixel[y0:y1, x0:x1] = True
    assert torch.equal(box_mask(boxes, 32, 32), pixel)  # at pixel resolution: exactly the boxes
    latent = box_mask(boxes, 32, 8)  # 4x4 pixel cells: a cell counts when it overlaps a box
    assert torch.equal(latent, F.max_pool2d(pixel[None, None].float(), 4)[0, 0].bool())
    w = region_weights([boxes, boxes, None], 32, 8, 0.1, apply=torch.tensor([True, False, True]))
    assert w.shape == (3, 1, 8, 8)
    torch.testing.assert_close(w[0, 0], 1 + 0.1 * latent.float())
    assert torch.equal(w[1], torch.ones(1, 8, 8)) and torch.equal(w[2], torch.ones(1, 8, 8))


def test_caption_enrichment():
    assert enrich_caption("a red circle", [("red", "circle")]) == "a red circle"
    assert enrich_caption("three small red circles", [("red", "circle")] * 3) == "three small red circles"
    assert (enrich_caption("a red circle", [("red", "circle"), ("blue", "square"), ("green", "triangle")])
            == "a red circle, with a blue square and a green triangle")
    assert enrich_caption("a dog on grass", ["dog", "frisbee"]) == "a dog on grass, with frisbee"
    assert isinstance(Word(0, 1, "a", "DET"), tuple)
