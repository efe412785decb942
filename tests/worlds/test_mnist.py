import torch

from ernielab.worlds.mnist import (
    NUMBER_WORDS,
    TEMPLATES,
    CaptionedMNIST,
    digit_caption,
    make_digit_prompts,
    parse_digit,
)

torch.set_num_threads(1)


def test_splits_are_disjoint_stratified_and_seed_independent():
    train, test = CaptionedMNIST("train"), CaptionedMNIST("test")
    assert len(train) + len(test) == 5000 and len(test) == 500
    assert torch.bincount(test.labels, minlength=10).tolist() == [50] * 10
    # No test image also appears in train (compare pixels, not indices).
    train_keys = {hash(img.numpy().tobytes()) for img in train.images}
    assert sum(hash(img.numpy().tobytes()) in train_keys for img in test.images) < 3  # MNIST has rare duplicates
    other_seed = CaptionedMNIST("test", seed=7)
    assert torch.equal(other_seed.images, test.images)
    assert other_seed.captions != test.captions  # the seed picks caption templates only


def test_items_follow_the_convention():
    data = CaptionedMNIST("test", image_size=32)
    item = data[3]
    assert set(item) == {"image", "caption", "label", "kind"} and item["kind"] == "digit"
    image = item["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0.5
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert (image[:, :2] == -1).all()  # the 2 px padding is black background
    assert parse_digit(item["caption"]) == item["label"]
    assert CaptionedMNIST("test", image_size=48)[0]["image"].shape == (3, 48, 48)


def test_every_caption_parses_back_to_its_label():
    data = CaptionedMNIST("test", seed=3)
    assert all(parse_digit(c) == int(d) for c, d in zip(data.captions, data.labels))
    assert len(set(data.captions)) > 40  # templates vary
    for label in range(10):
        for template in range(len(TEMPLATES)):
            assert parse_digit(digit_caption(label, template)) == label


def test_parse_digit_edge_cases():
    assert parse_digit("the number SEVEN") == 7
    assert parse_digit("an 8") == 8 and parse_digit("a handwritten eight") == 8
    assert parse_digit("a cat on a sofa") is None
    assert parse_digit("a 3 next to a 4") is None  # ambiguous
    assert parse_digit("7, i.e. seven") == 7  # same digit twice is fine
    assert parse_digit("12 apples") is None and parse_digit("someone") is None


def test_make_digit_prompts_balanced_and_reproducible():
    prompts = make_digit_prompts(40, seed=1)
    assert prompts == make_digit_prompts(40, seed=1) and prompts != make_digit_prompts(40, seed=2)
    digits = [parse_digit(p) for p in prompts]
    assert sorted(digits) == sorted(list(range(10)) * 4)
    assert any(w in " ".join(prompts) for w in NUMBER_WORDS)


def test_bad_split_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="split"):
        CaptionedMNIST("validation")
