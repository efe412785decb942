import numpy as np
import pytest

from ernielab.enhancer.intents import make_intents
from ernielab.worlds.phrasing import EVAL_STYLES, STYLES, phrase
from ernielab.worlds.prompt_facts import ObjectFacts, PromptFacts, contradictions, extract_facts, facts_of_spec
from ernielab.worlds.shapes import KINDS, caption, make_prompt_specs, sample_scene


def spec_cases():
    for kind in KINDS:
        for i, spec in enumerate(make_prompt_specs(kind, 60, seed=1)):
            if i % 3 == 0:
                spec.objects[0].size = "small"
            if i % 3 == 1:
                spec.objects[-1].size = "large"
            yield i, spec


@pytest.mark.parametrize("split,styles", [("train", STYLES), ("eval", EVAL_STYLES)])
def test_round_trip_every_style_and_phrasebook(split, styles):
    checked = 0
    for i, spec in spec_cases():
        for style in styles:
            text = phrase(spec, style, np.random.default_rng([i, len(style)]), split)
            assert extract_facts(text).same_as(facts_of_spec(spec)), text
            checked += 1
    assert checked == 180 * len(styles)


def test_round_trip_of_scene_captions_with_sizes_and_positions():
    for i in range(150):
        scene = sample_scene(np.random.default_rng(i), 32, KINDS[i % 3])
        objects = scene.objects if scene.kind == "relation" else scene.objects[:1]
        count = 1 if scene.kind == "relation" else len(scene.objects)
        want = PromptFacts([ObjectFacts(count, o.color, o.shape, o.size) for o in objects], scene.relation)
        for split, style in (("train", "detailed"), ("eval", "detailed")):  # detailed always says sizes
            text = phrase(scene, style, np.random.default_rng(i), split)
            assert extract_facts(text).same_as(want), text
        for text in (caption(scene, np.random.default_rng(i)), phrase(scene, "paraphrase", np.random.default_rng(i))):
            got = extract_facts(text)
            assert [(o.count, o.color, o.shape) for o in got.normalised().objects] == \
                [(o.count, o.color, o.shape) for o in want.normalised().objects], text
            assert contradictions(text, phrase(scene, "detailed", np.random.default_rng(i + 1), "eval")) == []


def test_enhancer_intents_and_their_targets():
    for kind in KINDS:
        for pair in make_intents(kind, 40, seed=3):
            got = extract_facts(pair.intent)
            want = [ObjectFacts(o.count, o.color, o.shape, o.size) for o in pair.spec.objects]
            assert got.objects == want and got.relation == pair.spec.relation, pair.intent
            assert contradictions(pair.intent, pair.target) == [], (pair.intent, pair.target)


@pytest.mark.parametrize("text,objects,relation", [
    ("a single red circle", [(1, "red", "circle", None)], None),
    ("1 big blue square", [(1, "blue", "square", "large")], None),
    ("a pair of cyan triangles", [(2, "cyan", "triangle", None)], None),
    ("some circles", [(None, None, "circle", None)], None),
    ("something purple", [(1, "purple", None, None)], None),
    ("to the left of a green triangle there is a red circle", [(1, "red", "circle", None), (1, "green", "triangle", None)],
     "left of"),
    ("a circle and a square", [(1, None, "circle", None), (1, None, "square", None)], None),
    ("a photo of the image", [], None),
])
def test_reads_single_phrases(text, objects, relation):
    got = extract_facts(text)
    assert [(o.count, o.color, o.shape, o.size) for o in got.objects] == objects
    assert got.relation == relation


@pytest.mark.parametrize("prompt,rewrite", [
    ("a red circle", "a photo of a large red circle on a black background"),  # size added
    ("something red", "a red triangle"),  # shape added
    ("a circle", "exactly one huge cyan circle"),  # colour added
    ("some squares", "three blue squares"),  # exact count added
    ("a circle left of a square", "a red square to the right of a yellow circle"),  # same relation, other order
    ("a red circle and a blue square", "a blue square above a red circle"),  # relation added
    ("two green triangles", "keywords: a pair of green triangles / dark canvas"),
])
def test_added_unstated_facts_are_no_contradiction(prompt, rewrite):
    assert contradictions(prompt, rewrite) == []


@pytest.mark.parametrize("prompt,rewrite,word", [
    ("a red circle", "a blue circle", "color"),
    ("a red circle", "a red square", "shape"),
    ("a small red circle", "a large red circle", "size"),
    ("three red circles", "two red circles", "count"),
    ("a red circle", "2 red circles", "count"),
    ("some circles", "a circle", "several"),
    ("a red circle left of a blue square", "a red circle above a blue square", "relation"),
    ("a red circle left of a blue square", "a blue square left of a red circle", "relation"),  # subject swapped
    ("a red circle left of a blue square", "a red circle and a blue square", "relation"),  # relation dropped
    ("a red circle left of a blue square", "a red circle", "object group"),
    ("a red circle", "the weather is nice", "no shapes-world object"),
])
def test_changed_facts_are_contradictions(prompt, rewrite, word):
    reasons = contradictions(prompt, rewrite)
    assert len(reasons) == 1 and word in reasons[0], reasons


def test_every_single_fact_change_of_a_paraphrase_is_caught():
    rng = np.random.default_rng(0)
    for i, spec in spec_cases():
        text = phrase(spec, "paraphrase", rng, "eval")
        changed = facts_of_spec(spec).objects[0]
        other_color = "red" if changed.color != "red" else "blue"
        rewrite = phrase(spec, "paraphrase", rng, "train").replace(changed.color, other_color)
        assert contradictions(text, rewrite), (text, rewrite)
