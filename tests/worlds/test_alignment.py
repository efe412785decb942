import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from ernielab.worlds.alignment import check, detect, score, to_uint8_image
from ernielab.worlds.shapes import COLORS, KINDS, SHAPES, Scene, caption, parse_prompt, render, sample_scene

N_PER_KIND = 300


@pytest.fixture(scope="module")
def scenes():
    """300 seeded scenes of every kind with a varied caption each."""
    out = {}
    for k, kind in enumerate(KINDS):
        items = []
        for i in range(N_PER_KIND):
            rng = np.random.default_rng([11, k, i])
            scene = sample_scene(rng, 32, kind)
            items.append((scene, caption(scene, rng)))
        out[kind] = items
    return out


def perturb(image, rng, noise=0.05, blur=1.0):
    """Generated-looking image: 1 px Gaussian blur plus Gaussian noise, floats in [0, 1]."""
    x = ndimage.gaussian_filter(image.astype(np.float32) / 255.0, sigma=(blur, blur, 0))
    return np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0)


def with_objects(scene, objects):
    return Scene(objects, scene.kind, scene.relation, scene.image_size)


def apart(a, b, gap=2):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def recolor(obj, color):
    return dataclasses.replace(obj, color=color)


def test_ground_truth_renders_pass(scenes):
    prompts = [c for kind in KINDS for _, c in scenes[kind]]
    images = np.stack([render(s) for kind in KINDS for s, _ in scenes[kind]])
    result = score(prompts, images, return_per_image=True)
    assert result["n"] == 3 * N_PER_KIND and len(result["per_image"]) == 3 * N_PER_KIND
    for kind in KINDS:
        rates = result["by_kind"][kind]
        assert rates["n"] == N_PER_KIND
        assert rates["all"] >= 0.99, (kind, rates)
        assert (rates["relation"] is None) == (kind != "relation")
    assert result["overall"]["all"] >= 0.99


def test_perturbed_renders_still_pass(scenes):
    rng = np.random.default_rng(0)
    for kind in KINDS:
        ok = [check(c, perturb(render(s), rng))["all"] for s, c in scenes[kind]]
        assert np.mean(ok) >= 0.95, kind


def test_small_specks_are_ignored(scenes):
    rng = np.random.default_rng(1)
    ok = []
    for s, c in scenes["count"][:100] + scenes["relation"][:100]:
        image = render(s)
        for _ in range(3):  # 2x2 blobs of palette colour on background
            y, x = rng.integers(0, 30, size=2)
            if not image[y : y + 2, x : x + 2].any():
                image[y : y + 2, x : x + 2] = list(COLORS.values())[rng.integers(6)]
        ok.append(check(c, image)["all"])
    assert np.mean(ok) >= 0.95


def _false_rate(pairs, attr):
    return np.mean([check(prompt, render(scene))[attr] is False for scene, prompt in pairs])


def test_wrong_colour_fails(scenes):
    def swapped(scene):  # every object of object 0's colour gets an unused colour
        used = {o.color for o in scene.objects}
        new = next(c for c in COLORS if c not in used)
        old = scene.objects[0].color
        return with_objects(scene, [recolor(o, new) if o.color == old else o for o in scene.objects])

    for kind in KINDS:
        pairs = [(swapped(s), c) for s, c in scenes[kind]]
        assert _false_rate(pairs, "color") >= 0.99, kind
        assert _false_rate(pairs, "all") >= 0.99, kind


def test_wrong_shape_fails(scenes):
    def reshaped(scene):
        a = scene.objects[0]
        taken = {(o.color, o.shape) for o in scene.objects}
        new = next(sh for sh in SHAPES if (a.color, sh) not in taken)
        same = lambda o: (o.color, o.shape) == (a.color, a.shape)  # noqa: E731
        return with_objects(scene, [dataclasses.replace(o, shape=new) if same(o) else o for o in scene.objects])

    for kind in KINDS:
        pairs = [(reshaped(s), c) for s, c in scenes[kind]]
        assert _false_rate(pairs, "shape") >= 0.99, kind
        assert _false_rate(pairs, "all") >= 0.99, kind


def test_missing_or_extra_object_fails_count(scenes):
    dropped = [(with_objects(s, s.objects[:-1]), c) for s, c in scenes["count"] + scenes["relation"]]
    assert _false_rate(dropped, "count") >= 0.99
    assert _false_rate([(s, c) for s, c in dropped if s.relation], "relation") >= 0.99
    # the remaining objects are still there
    assert np.mean([check(c, render(s))["color"] for s, c in dropped if s.kind == "count"]) >= 0.99

    def plus_one(scene):  # a copy of a count object placed where it fits; skipped when nothing fits
        for extra in scenes["single"]:
            box = extra[0].objects[0].bbox
            if all(apart(box, o.bbox) for o in scene.objects):
                return with_objects(scene, scene.objects + [dataclasses.replace(scene.objects[0], bbox=box)])
        return None

    extra = [(plus_one(s), c) for s, c in scenes["count"] + scenes["single"][:100]]
    extra = [(s, c) for s, c in extra if s is not None]
    assert len(extra) > 200
    assert _false_rate(extra, "count") >= 0.99
    assert np.mean([check(c, render(s))["shape"] for s, c in extra]) >= 0.99  # shape alone cannot tell


def test_mirrored_relation_fails(scenes):
    def mirrored(scene):
        size = scene.image_size
        horizontal = scene.relation in ("left of", "right of")

        def flip(o):
            x0, y0, x1, y1 = o.bbox
            box = (size - x1, y0, size - x0, y1) if horizontal else (x0, size - y1, x1, size - y0)
            return dataclasses.replace(o, bbox=box)

        return with_objects(scene, [flip(o) for o in scene.objects])

    pairs = [(mirrored(s), c) for s, c in scenes["relation"]]
    assert _false_rate(pairs, "relation") >= 0.99
    # everything else about the mirrored image still matches
    assert np.mean([check(c, render(s))["count"] for s, c in pairs]) >= 0.99
    # a true left/right image mirrored as pixels fails as well
    lr = [(s, c) for s, c in scenes["relation"] if s.relation in ("left of", "right of")]
    assert np.mean([check(c, np.ascontiguousarray(render(s)[:, ::-1]))["relation"] is False for s, c in lr]) >= 0.99


def test_blank_and_garbage_images_fail():
    blank = np.zeros((32, 32, 3), np.uint8)
    nothing = {"color": False, "shape": False, "count": False, "relation": None, "all": False}
    assert check("a red circle", blank) == nothing
    assert detect(np.full((32, 32, 3), 255, np.uint8)) == []  # white is no palette colour
    noise = np.random.default_rng(0).random((32, 32, 3))
    assert not check("two blue squares", noise)["all"]
    assert check("a red circle above a blue square", blank)["relation"] is False


def test_detections_describe_the_objects(scenes):
    for s, _ in scenes["count"][:50]:
        dets = detect(render(s))
        assert len(dets) == len(s.objects)
        for d, o in zip(sorted(dets, key=lambda d: d.center), sorted(s.objects, key=lambda o: o.center)):
            assert (d.color, d.shape) == (o.color, o.shape)
            assert np.abs(np.subtract(d.bbox, o.bbox)).max() <= 1


def test_image_formats_agree(scenes):
    scene, prompt = scenes["relation"][0]
    image = render(scene)
    expected = check(prompt, image)
    assert expected["all"]
    as_float = image.astype(np.float32) / 255.0
    as_tensor = torch.from_numpy(as_float).permute(2, 0, 1) * 2 - 1
    for variant in (as_float, as_tensor, as_tensor.numpy(), image.astype(np.float64)):
        assert check(prompt, variant) == expected
        assert np.array_equal(to_uint8_image(variant), image)
    batch = torch.stack([as_tensor, as_tensor])
    assert score([prompt, parse_prompt(prompt)], batch)["overall"]["all"] == 1.0


def test_score_validates_inputs():
    with pytest.raises(ValueError, match="prompts"):
        score(["a red circle"], np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot parse"):
        score(["a red dog"], np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="image"):
        check("a red circle", np.zeros((32, 32), np.uint8))
