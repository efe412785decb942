import numpy as np
import pytest

from ernielab.worlds import phrasing
from ernielab.worlds.phrasing import (
    DEFAULT_STYLE_WEIGHTS,
    EVAL,
    EVAL_STYLES,
    STYLES,
    TRAIN,
    could_produce,
    diversified_caption,
    eval_prompts,
    paraphrase_prompts,
    phrase,
    template_twins,
)
from ernielab.worlds.shapes import KINDS, Scene, caption, make_prompts, parse_prompt, sample_scene


def scenes(n, seed=0):
    return [sample_scene(np.random.default_rng([seed, i]), 32, KINDS[i % 3]) for i in range(n)]


def test_phrasebooks_share_no_frame_or_wording():
    train, held_out = TRAIN.wordings(), EVAL.wordings()
    assert set(train) == set(held_out)
    for category in train:
        assert train[category] and held_out[category]
        assert not train[category] & held_out[category], category


def test_no_eval_prompt_can_be_made_by_the_train_grammar():
    train_texts, eval_texts = set(), set()
    for i, scene in enumerate(scenes(900)):
        rng = np.random.default_rng(i)
        for style in STYLES:
            train_texts.add(phrase(scene, style, rng, "train"))
        for style in EVAL_STYLES:
            eval_texts.add(phrase(scene, style, rng, "eval"))
    assert len(train_texts) > 3000 and len(eval_texts) > 2500
    assert not train_texts & eval_texts
    # the grammars cover their own phrasebook (so the check below can fail) ...
    assert all(could_produce(t, "train") for t in train_texts)
    assert all(could_produce(t, "eval") for t in eval_texts)
    # ... and no held-out prompt is a string the train grammar can make
    assert not [t for t in eval_texts if could_produce(t, "train")]
    assert not [t for t in train_texts if could_produce(t, "eval")]


def test_template_style_is_todays_caption_and_absent_from_eval():
    scene = scenes(1)[0]
    assert phrase(scene, "template", np.random.default_rng(3)) == caption(scene, np.random.default_rng(3))
    with pytest.raises(ValueError, match="template"):
        phrase(scene, "template", np.random.default_rng(0), "eval")
    with pytest.raises(ValueError, match="style"):
        phrase(scene, "poem", np.random.default_rng(0))


def test_styles_say_what_they_promise():
    rng = np.random.default_rng(0)
    count_scenes = [s for s in scenes(60) if s.kind == "count"]
    for scene in count_scenes:
        n = len(scene.objects)
        assert str(n) in phrase(scene, "digits", rng).split()
        detailed = phrase(scene, "detailed", rng)
        assert scene.objects[0].size in detailed or any(w in detailed for w in TRAIN.sizes[scene.objects[0].size])
        assert detailed.count(" one ") >= n  # one position per object
        assert "," in phrase(scene, "keywords", rng)
    single = [s for s in scenes(90) if s.kind == "single"]
    texts = [" " + phrase(s, style, np.random.default_rng(i)) for i, s in enumerate(single) for style in STYLES]
    for number in (" a ", " one ", " a single ", " 1 "):  # every way training says "one object"
        assert any(number in t for t in texts), number


def test_relations_come_in_many_wordings():
    rel = [s for s in scenes(600) if s.kind == "relation" and s.relation == "left of"]
    texts = [phrase(s, "paraphrase", np.random.default_rng(i)) for i, s in enumerate(rel)]
    used = {w for w in TRAIN.relations["left of"] + TRAIN.relations["right of"] if any(f" {w} " in t for t in texts)}
    assert len(used) >= 6


def test_diversified_caption_is_deterministic_and_mixes_styles():
    items = scenes(400)
    first = [diversified_caption(s, np.random.default_rng(i)) for i, s in enumerate(items)]
    assert first == [diversified_caption(s, np.random.default_rng(i)) for i, s in enumerate(items)]
    templates = sum(parse_ok(t) for t in first) / len(first)
    assert DEFAULT_STYLE_WEIGHTS["template"] - 0.1 < templates < 0.75  # templates plus a few parseable rewordings
    only = [diversified_caption(s, np.random.default_rng(i), {"keywords": 1.0}) for i, s in enumerate(items[:30])]
    assert all("," in t for t in only)
    with pytest.raises(ValueError):
        diversified_caption(items[0], np.random.default_rng(0), {"sonnet": 1.0})
    with pytest.raises(ValueError):
        diversified_caption(items[0], np.random.default_rng(0), {"template": 0.0})


def parse_ok(text):
    try:
        parse_prompt(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("kind", KINDS)
def test_template_twins_match_make_prompts(kind):
    twins = template_twins(kind, 40, seed=2)
    assert [t for t, _, _ in twins] == make_prompts(kind, 40, seed=2)
    assert twins == template_twins(kind, 40, seed=2)
    for template, text, spec in twins:
        assert spec.kind == kind and spec.text == text and text != template
        assert could_produce(text, "eval") and not could_produce(text, "train")
        assert parse_prompt(template).objects == spec.objects
    assert [(t, s) for _, t, s in twins] == paraphrase_prompts(kind, 40, seed=2)
    assert {p.style for p in eval_prompts(kind, 40, seed=2)} == set(EVAL_STYLES)


def test_phrase_of_a_spec_keeps_its_sizes():
    spec = parse_prompt("a large red circle")
    texts = [phrase(spec, s, np.random.default_rng(i), "eval") for i in range(20) for s in EVAL_STYLES]
    assert all(any(w in t for w in EVAL.sizes["large"]) for t in texts)
    bare = parse_prompt("a red circle")
    assert not any(w in phrase(bare, "paraphrase", np.random.default_rng(0)) for w in ("small", "large", "big", "tiny"))
    with pytest.raises(TypeError):
        phrase("a red circle", "paraphrase", np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot word"):
        phrase(parse_prompt("four red circles"), "paraphrase", np.random.default_rng(0))
    assert isinstance(scenes(1)[0], Scene) and phrasing.STYLES == STYLES
