import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ernielab.worlds.shapes import (
    COLORS,
    INVERSE_RELATION,
    KINDS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapesWorld,
    ShapesWorldConfig,
    caption,
    collate_shapes,
    make_prompts,
    parse_prompt,
    relation_holds,
    render,
    render_mask,
    sample_scene,
    save_split,
    scene_from_prompt,
    shape_coverage,
)


def scenes_of(kind, n=300, image_size=32):
    return [sample_scene(np.random.default_rng([7, i]), image_size, kind) for i in range(n)]


def test_palette_colours_are_distinct_and_bright():
    values = np.array(list(COLORS.values()), dtype=float)
    assert len(COLORS) == 6 and set(COLORS) == {"red", "green", "blue", "yellow", "purple", "cyan"}
    assert (values.max(axis=1) >= 200).all()  # far from the black background
    dists = np.linalg.norm(values[:, None] - values[None], axis=-1)
    assert dists[~np.eye(6, dtype=bool)].min() > 100


def test_shape_fill_ratios_tell_shapes_apart():
    fills = {s: shape_coverage(s, 10, 10).mean() for s in SHAPES}
    assert fills["square"] == pytest.approx(1.0)
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert fills["triangle"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_scene_invariants(kind, image_size):
    gap = 2 * image_size // 32
    for scene in scenes_of(kind, 150, image_size):
        objs = scene.objects
        assert scene.kind == kind and scene.image_size == image_size
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            assert x1 - x0 == y1 - y0
            assert o.shape in SHAPES and o.color in COLORS and o.size in ("small", "large")
        for i, a in enumerate(objs):  # never overlapping, never touching
            for b in objs[i + 1 :]:
                ab, bb = a.bbox, b.bbox
                assert ab[2] + gap <= bb[0] or bb[2] + gap <= ab[0] or ab[3] + gap <= bb[1] or bb[3] + gap <= ab[1]
        if kind == "single":
            assert len(objs) == 1 and scene.relation is None
        elif kind == "count":
            assert len(objs) in (2, 3) and scene.relation is None
            assert len({(o.shape, o.color, o.size, o.bbox[2] - o.bbox[0]) for o in objs}) == 1
        else:
            assert len(objs) == 2 and scene.relation in RELATIONS
            assert (objs[0].color, objs[0].shape) != (objs[1].color, objs[1].shape)
            assert relation_holds(objs[0].bbox, objs[1].bbox, scene.relation, gap)
            assert not relation_holds(objs[0].bbox, objs[1].bbox, INVERSE_RELATION[scene.relation], 0)


def test_sizes_scale_with_image_size():
    for image_size in (32, 64):
        sides = {}
        for scene in scenes_of("single", 200, image_size):
            o = scene.objects[0]
            sides.setdefault(o.size, []).append(o.bbox[2] - o.bbox[0])
        assert 0.26 < np.mean(sides["small"]) / image_size < 0.34
        assert 0.38 < np.mean(sides["large"]) / image_size < 0.5


def test_every_kind_mix_appears_with_default_weights():
    rng = np.random.default_rng(0)
    kinds = [sample_scene(rng).kind for _ in range(500)]
    freq = {k: kinds.count(k) / len(kinds) for k in KINDS}
    assert freq["single"] == pytest.approx(0.4, abs=0.07)
    assert freq["count"] == pytest.approx(0.2, abs=0.07)
    assert freq["relation"] == pytest.approx(0.4, abs=0.07)


def test_render_and_mask_agree():
    for kind in KINDS:
        for scene in scenes_of(kind, 40):
            image, mask = render(scene), render_mask(scene)
            assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
            assert mask.dtype == np.int64 and mask.shape == (32, 32)
            assert set(np.unique(mask)) == set(range(len(scene.objects) + 1))
            assert (image[mask == 0].max(axis=-1) < 180).all()  # only soft edges outside masks
            for i, o in enumerate(scene.objects):
                pixels = image[mask == i + 1].astype(float)
                assert np.abs(pixels.mean(axis=0) - COLORS[o.color]).max() < 30
                x0, y0, x1, y1 = o.bbox
                assert (np.argwhere(mask == i + 1) >= [y0, x0]).all() and (np.argwhere(mask == i + 1) < [y1, x1]).all()


def test_scene_dict_round_trip():
    for kind in KINDS:
        scene = scenes_of(kind, 1)[0]
        data = json.loads(json.dumps(scene.to_dict()))
        assert Scene.from_dict(data) == scene


def _same_meaning(spec, scene):
    """Parsed spec describes the scene (relation possibly stated from the other side)."""
    objs = scene.objects
    if scene.kind == "relation":
        a, b, rel = spec.objects[0], spec.objects[1], spec.relation
        if (a.color, a.shape) != (objs[0].color, objs[0].shape):
            a, b, rel = b, a, INVERSE_RELATION[rel]
        pairs = [(a, objs[0]), (b, objs[1])]
        return rel == scene.relation and all(
            (s.count, s.color, s.shape) == (1, o.color, o.shape) and s.size in (None, o.size) for s, o in pairs
        )
    (s,) = spec.objects
    o = objs[0]
    same = (s.count, s.color, s.shape) == (len(objs), o.color, o.shape)
    return spec.relation is None and same and s.size in (None, o.size)


def test_every_caption_parses_back():
    rng = np.random.default_rng(0)
    texts = set()
    with_size = 0
    for i in range(1500):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        texts.add(text)
        spec = parse_prompt(text)
        assert spec.kind == scene.kind, text
        assert _same_meaning(spec, scene), text
        with_size += any(o.size for o in spec.objects)
    assert len(texts) > 500  # templates vary
    assert 0.15 < with_size / 1500 < 0.7  # size words sometimes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  A   Red CIRCLE. ", ([(1, "red", "circle", None)], None, "single")),
        ("there are 3 small cyan triangles", ([(3, "cyan", "triangle", "small")], None, "count")),
        ("Two blue squares!", ([(2, "blue", "square", None)], None, "count")),
        ("a big green square", ([(1, "green", "square", "large")], None, "single")),
        (
            "a yellow circle on the left of a purple square",
            ([(1, "yellow", "circle", None), (1, "purple", "square", None)], "left of", "relation"),
        ),
        (
            "a photo of a red triangle is under a blue circle",
            ([(1, "red", "triangle", None), (1, "blue", "circle", None)], "below", "relation"),
        ),
    ],
)
def test_parse_prompt_is_tolerant(text, expected):
    objects, relation, kind = expected
    spec = parse_prompt(text)
    assert [(o.count, o.color, o.shape, o.size) for o in spec.objects] == objects
    assert spec.relation == relation and spec.kind == kind


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a dog",
        "red circles",  # plural without a count
        "a red hexagon",
        "a circle",
        "a red circle and a blue square",
        "a red circle near a blue square",
    ],
)
def test_parse_prompt_rejects_other_text(text):
    with pytest.raises(ValueError, match="cannot parse shapes-world prompt"):
        parse_prompt(text)


def test_make_prompts_canonical_balanced_deterministic():
    singles = make_prompts("single", 18)
    assert len(set(singles)) == 18 and "a red circle" in singles
    counts = make_prompts("count", 40, seed=1)
    assert len(set(counts[:36])) == 36 and "two blue squares" in counts[:36]
    relations = make_prompts("relation", 200)
    assert make_prompts("relation", 200) == relations and make_prompts("relation", 200, seed=1) != relations
    for kind, prompts in (("single", singles), ("count", counts), ("relation", relations)):
        for p in prompts:
            spec = parse_prompt(p)
            assert spec.kind == kind and all(o.size is None for o in spec.objects)
            assert not re.search(r"photo|there|image|small|large", p)
    assert {parse_prompt(p).relation for p in relations} == set(RELATIONS)
    with pytest.raises(ValueError):
        make_prompts("many", 3)


def test_scene_from_prompt_matches_prompt():
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for p in make_prompts(kind, 30):
            spec = parse_prompt(p)
            assert _same_meaning(spec, scene_from_prompt(p, rng))


def test_dataset_items_are_deterministic_and_well_formed():
    ds = ShapesWorld(16, seed=3)
    a, b = ds[5], ShapesWorld(16, seed=3)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
    img = a["image"]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1 and img.min() == -1
    n = len(a["scene"]["objects"])
    assert a["boxes"].shape == (n, 4) and a["boxes"].dtype == torch.float32
    assert a["mask"].dtype == torch.int64 and int(a["mask"].max()) == n
    assert parse_prompt(a["caption"]).kind == a["kind"] == a["scene"]["kind"]
    json.dumps(a["scene"])
    # other seed / other split give other items
    assert not torch.equal(ShapesWorld(16, seed=4)[5]["image"], img)
    assert not torch.equal(ShapesWorld(16, seed=3, split="test")[5]["image"], img)
    assert ds[-1]["caption"] == ds[15]["caption"]
    with pytest.raises(IndexError):
        ds[16]


def test_splits_never_share_an_image():
    def images(split):
        ds = ShapesWorld(300, seed=0, split=split)
        return {render(ds.scene(i)[0]).tobytes() for i in range(len(ds))}

    train, test = images("train"), images("test")
    assert len(train) > 250 and len(test) > 250
    assert not train & test


def test_kind_selection_config_and_bad_arguments():
    assert {ShapesWorld(20, kinds=["count"])[i]["kind"] for i in range(20)} == {"count"}
    mixed = ShapesWorld(30, kinds={"single": 1.0, "relation": 1.0})
    assert {mixed[i]["kind"] for i in range(30)} == {"single", "relation"}
    cfg = ShapesWorldConfig(image_size=64, seed=2, kind_weights={"relation": 1.0})
    assert ShapesWorldConfig.from_dict(json.loads(cfg.to_json())) == cfg
    ds = ShapesWorld.from_config(cfg, 4, split="val")
    assert ds[0]["image"].shape == (3, 64, 64) and ds[0]["kind"] == "relation"
    with pytest.raises(ValueError, match="split"):
        ShapesWorld(4, split="dev")
    with pytest.raises(ValueError, match="kinds"):
        ShapesWorld(4, kinds=["pairs"])
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(4, image_size=8)


def test_collate_with_dataloader():
    loader = torch.utils.data.DataLoader(ShapesWorld(6), batch_size=4, collate_fn=collate_shapes)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert len(batch["caption"]) == len(batch["boxes"]) == len(batch["kind"]) == len(batch["scene"]) == 4


def test_save_split_writes_pngs_and_captions(tmp_path):
    ds = ShapesWorld(5, split="test")
    out = save_split(ds, tmp_path / "ref", progress=False)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for i, row in enumerate(rows):
        saved = np.asarray(Image.open(out / row["file"]))
        assert np.array_equal(saved, render(Scene.from_dict(row["scene"])))
        assert row["caption"] == ds[i]["caption"]


def test_data_config_kind_weights_reach_the_dataset():
    from collections import Counter

    from ernielab.worlds.registry import DataConfig, build_dataset

    only_relations = build_dataset(DataConfig(size=50, kind_weights={"relation": 1.0}))
    assert Counter(only_relations[i]["kind"] for i in range(50)) == {"relation": 50}
    cfg = DataConfig.from_dict(DataConfig(kind_weights={"single": 1.0, "count": 0.0}).to_dict())
    assert {build_dataset(cfg.replace(size=20))[i]["kind"] for i in range(20)} == {"single"}
    with pytest.raises(ValueError, match="kinds must be"):
        build_dataset(DataConfig(kind_weights={"triangle": 1.0}))


# ----------------------------------------------------------------------------- caption styles and held-out combinations


def test_default_captions_are_todays_templates():
    from ernielab.worlds.shapes import sample_item_scene

    ds = ShapesWorld(40, seed=5)
    for i in range(40):
        scene, rng = sample_item_scene(5, "train", i)
        assert ds.scene(i)[1] == caption(scene, rng)


def test_caption_styles_vary_wording_deterministically():
    from ernielab.worlds.registry import DataConfig, build_dataset
    from ernielab.worlds.shapes import sample_item_scene

    data = DataConfig(size=200, seed=5, caption_styles={"paraphrase": 1.0, "keywords": 1.0})
    ds = build_dataset(data)
    texts = [ds.scene(i)[1] for i in range(200)]
    assert texts == [build_dataset(data).scene(i)[1] for i in range(200)]
    assert sum("," in t for t in texts) > 50  # keyword lists
    plain = ShapesWorld(200, seed=5)
    assert all(ds.scene(i)[0] == plain.scene(i)[0] for i in range(200))  # same scenes, other words
    assert sum(t != plain.scene(i)[1] for i, t in enumerate(texts)) > 150
    scene, _ = sample_item_scene(5, "train", 0)
    assert ds[0]["scene"] == scene.to_dict()


def test_holdout_combinations_never_appear_in_scenes():
    from ernielab.worlds.shapes import has_combination, parse_combination

    held = ["red triangle left of", "blue circle above"]
    combos = [parse_combination(c) for c in held]
    plain = ShapesWorld(1200, seed=1, kinds=["relation"])
    assert sum(has_combination(plain.scene(i)[0], combos) for i in range(1200)) > 20  # they do occur by default
    ds = ShapesWorld(1200, seed=1, kinds=["relation"], holdout_combinations=held)
    for i in range(1200):
        scene, _ = ds.scene(i)
        a, b = scene.objects
        assert (a.color, a.shape, scene.relation) not in combos
        assert (b.color, b.shape, INVERSE_RELATION[scene.relation]) not in combos
    assert ds.scene(7) == ShapesWorld(1200, seed=1, kinds=["relation"], holdout_combinations=held).scene(7)


@pytest.mark.parametrize("field,value,match", [
    ("caption_styles", {"poem": 1.0}, "caption_styles"),
    ("caption_styles", {"template": -1.0}, "caption_styles"),
    ("holdout_combinations", ["red hexagon left of"], "holdout_combinations"),
    ("holdout_combinations", ["red triangle near"], "holdout_combinations"),
    ("holdout_combinations", [f"{c} {s} {r}" for c in COLORS for s in SHAPES for r in RELATIONS], "no relation scene"),
])
def test_data_config_refuses_bad_styles_and_combinations(field, value, match):
    from ernielab.core.config import ConfigError
    from ernielab.worlds.registry import DataConfig

    with pytest.raises(ConfigError, match=match):
        DataConfig.from_dict({field: value})
    with pytest.raises(ConfigError, match="shapes"):
        DataConfig.from_dict({"kind": "mnist", field: value})


def test_data_config_round_trips_new_fields():
    from ernielab.worlds.registry import DataConfig

    data = DataConfig(caption_styles={"template": 0.5, "digits": 0.5}, holdout_combinations=["red triangle left of"])
    assert DataConfig.from_dict(json.loads(json.dumps(data.to_dict()))) == data


def test_combination_prompts_split_held_out_from_seen():
    from ernielab.worlds.shapes import combination_prompt_specs, has_combination, parse_combination

    held = ["red triangle left of", "green square below"]
    combos = [parse_combination(c) for c in held]
    specs = combination_prompt_specs(held, 30, seed=4)
    assert len(specs["heldout"]) == len(specs["seen"]) == 30
    for spec in specs["heldout"]:
        a, b = spec.objects
        assert (a.color, a.shape, spec.relation) in combos and (b.color, b.shape) != (a.color, a.shape)
        assert parse_prompt(spec.text).objects == spec.objects
    for spec in specs["seen"]:
        scene = scene_from_prompt(spec, np.random.default_rng(0))
        assert not has_combination(scene, combos)
    assert specs == combination_prompt_specs(held, 30, seed=4)
    with pytest.raises(ValueError):
        combination_prompt_specs([], 3)


def test_make_prompt_specs_state_make_prompts():
    from ernielab.worlds.shapes import make_prompt_specs

    for kind in KINDS:
        specs = make_prompt_specs(kind, 50, seed=3)
        assert [s.text for s in specs] == make_prompts(kind, 50, seed=3)
        assert all(parse_prompt(s.text).objects == s.objects and s.kind == kind for s in specs)
