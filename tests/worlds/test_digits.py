import numpy as np
import pytest
import torch

from ernielab.worlds.digits import (
    DEFAULT_WEIGHTS,
    DigitClassifier,
    DigitClassifierConfig,
    classify_digits,
    digit_alignment,
    load_digit_classifier,
    read_digit_classifier_metadata,
    save_digit_classifier,
    train_digit_classifier,
)
from ernielab.worlds.mnist import CaptionedMNIST, digit_caption

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def test_split():
    return CaptionedMNIST("test")


def test_shipped_classifier_is_small_and_accurate(test_split):
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    predicted = classify_digits(torch.stack([test_split[i]["image"] for i in range(len(test_split))]))
    accuracy = (predicted == test_split.labels).float().mean().item()
    assert accuracy >= 0.95
    stored = read_digit_classifier_metadata()["summary"]["heldout_accuracy"]
    assert abs(accuracy - stored) < 1e-6  # the metadata tells the truth about these weights


def test_alignment_correct_vs_shuffled_prompts(test_split):
    images = test_split.images[:200].expand(-1, 3, -1, -1)
    labels = test_split.labels[:200]
    right = [digit_caption(int(d), int(d) % 8) for d in labels]
    wrong = [digit_caption((int(d) + 1 + i % 9) % 10) for i, d in enumerate(labels)]  # never the true digit
    shuffled = [right[i] for i in np.random.default_rng(0).permutation(200)]
    assert digit_alignment(right, images)["accuracy"] >= 0.95
    assert digit_alignment(wrong, images)["accuracy"] <= 0.05
    result = digit_alignment(shuffled, images)
    assert result["n"] == 200 and 0.02 < result["accuracy"] < 0.25  # chance is about 0.1


def test_input_forms_and_sizes_agree(test_split):
    images = test_split.images[:20].expand(-1, 3, -1, -1)
    reference = classify_digits(images)
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(classify_digits(as_uint8), reference)
    as_arrays = [im.permute(1, 2, 0).numpy() for im in as_uint8]
    assert torch.equal(classify_digits(as_arrays), reference)
    big = torch.nn.functional.interpolate(images, size=64, mode="nearest")
    assert (classify_digits(big) == reference).float().mean() >= 0.9
    tinted = (images + 1) * torch.tensor([1.0, 0.6, 0.8]).view(1, 3, 1, 1) - 1  # colour casts do not matter much
    assert (classify_digits(tinted) == reference).float().mean() >= 0.9
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (classify_digits(noisy) == reference).float().mean() >= 0.9


def test_alignment_skips_prompts_without_digits(test_split):
    images = test_split.images[:3]
    prompts = [digit_caption(int(test_split.labels[0])), "a cat", digit_caption(int(test_split.labels[2]))]
    result = digit_alignment(prompts, images)
    assert result == {"n": 2, "accuracy": 1.0, "skipped": 1}
    with pytest.raises(ValueError, match="prompts"):
        digit_alignment(prompts[:2], images)
    with pytest.raises(ValueError, match="names a single digit"):
        digit_alignment(["a cat"], images[:1])


def test_short_training_round_trips_and_is_reproducible(tmp_path):
    config = DigitClassifierConfig(widths=(4, 8, 8))
    kwargs = dict(epochs=1, batch_size=128, lr=1e-2, seed=1, config=config, progress=False)
    model, summary = train_digit_classifier(**kwargs)
    again, _ = train_digit_classifier(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert summary["heldout_accuracy"] > 0.5  # a 1.5k-parameter net learns digits in one epoch
    path = save_digit_classifier(model, tmp_path / "d.safetensors", summary)
    loaded = load_digit_classifier(path)
    assert loaded.config == config
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), model.eval()(x))


def test_wrong_checkpoint_is_rejected(tmp_path):
    path = save_digit_classifier(DigitClassifier(DigitClassifierConfig(widths=(4, 8, 8))), tmp_path / "a.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(tensors, tmp_path / "no_meta.safetensors")
    with pytest.raises(ValueError, match="not a digit classifier"):
        load_digit_classifier(tmp_path / "no_meta.safetensors")
    with pytest.raises(FileNotFoundError):
        load_digit_classifier(tmp_path / "missing.safetensors")
