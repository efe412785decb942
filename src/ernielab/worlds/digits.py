"""Digit accuracy of generated MNIST samples: a small CNN trained here says which digit an image shows.

The shipped weights (`ernielab/assets/digit_classifier.safetensors`, config and held-out accuracy
in its metadata) come from `scripts/train_digit_classifier.py` on the CaptionedMNIST train split.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ernielab.core.config import Config
from ernielab.core.images import to_uint8_batch
from ernielab.worlds.mnist import CaptionedMNIST, parse_digit

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier.safetensors"


@dataclasses.dataclass
class DigitClassifierConfig(Config):
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the three conv stages; each stage halves the resolution
    num_classes: int = 10
    dropout: float = 0.2


class DigitClassifier(nn.Module):
    """Images [N, C, H, W] in [-1, 1] -> logits [N, 10]. Channels are averaged first: digits are gray,
    so a colour cast in generated samples only changes brightness, which training augments anyway."""

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DigitClassifierConfig()
        layers, channels = [], 1
        for width in config.widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        # Flatten, not global pooling: where a stroke sits tells a 6 from a 9.
        side = config.image_size // 2 ** len(config.widths)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(channels * side**2, config.num_classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images.mean(dim=1, keepdim=True)))


def _random_affine(images: Tensor, generator: torch.Generator) -> Tensor:
    """Small random rotation, scale, shear and shift: handwriting varies like this, generated digits too."""
    n = len(images)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    angle, scale, shear = rand(-0.25, 0.25), rand(0.85, 1.1), rand(-0.2, 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear * cos, rand(-0.15, 0.15)], dim=1),
        torch.stack([sin, cos + shear * sin, rand(-0.15, 0.15)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Pad with the background value (-1) by shifting to [0, 2] where grid_sample pads with 0.
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def _random_photometric(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random contrast, brightness and noise: generated samples rarely have MNIST's exact black and white."""
    n = len(images)
    rand = lambda lo, hi: (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator))  # noqa: E731
    x = (images + 1) * rand(0.6, 1.0) - 1 + rand(0.0, 0.3)  # strokes dimmer, background lifted
    noise = torch.randn(images.shape, generator=generator) * rand(0.0, 0.15)
    return (x + noise).clamp(-1, 1)


@torch.no_grad()
def evaluate(model: DigitClassifier, dataset: CaptionedMNIST, batch_size: int = 500) -> float:
    """Accuracy of `model` on a CaptionedMNIST split."""
    model.eval()
    predictions = [model(dataset.images[i : i + batch_size]).argmax(1) for i in range(0, len(dataset), batch_size)]
    return (torch.cat(predictions) == dataset.labels).float().mean().item()


def train_digit_classifier(
    epochs: int = 20, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
    config: DigitClassifierConfig | None = None, progress: bool = True,
) -> tuple[DigitClassifier, dict]:
    """Train on the CaptionedMNIST train split; returns the model and a summary with held-out accuracy."""
    config = config or DigitClassifierConfig()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = CaptionedMNIST("train", image_size=config.image_size)
    test = CaptionedMNIST("test", image_size=config.image_size)
    model = DigitClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="digit classifier", disable=not progress)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), batch_size):
            index = order[i : i + batch_size]
            images = _random_photometric(_random_affine(train.images[index], generator), generator)
            loss = F.cross_entropy(model(images), train.labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", test_acc=f"{evaluate(model, test):.4f}")
    bar.close()
    model.eval()
    summary = {
        "heldout_accuracy": evaluate(model, test),
        "train_accuracy": evaluate(model, train),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, summary


def save_digit_classifier(model: DigitClassifier, path: str | Path, summary: dict | None = None) -> Path:
    """Weights plus config (and training summary) in the safetensors metadata: one self-describing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": model.config.to_json(), "summary": json.dumps(summary or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


def read_digit_classifier_metadata(path: str | Path = DEFAULT_WEIGHTS) -> dict:
    """{"config": DigitClassifierConfig, "summary": dict} stored with the weights."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} is not a digit classifier checkpoint (no 'config' in its metadata)")
    return {
        "config": DigitClassifierConfig.from_dict(json.loads(metadata["config"])),
        "summary": json.loads(metadata.get("summary", "{}")),
    }


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> DigitClassifier:
    model = DigitClassifier(read_digit_classifier_metadata(path)["config"])
    try:
        model.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored config: {e}") from None
    return model.eval().requires_grad_(False)


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The classifier in eval mode (shipped weights by default); loaded once per path."""
    path = Path(path or DEFAULT_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"digit classifier weights not found: {path} (train them with scripts/train_digit_classifier.py)"
        )
    return _load_cached(str(path.resolve()))


def _to_model_input(images, image_size: int) -> Tensor:
    if isinstance(images, Tensor) and images.ndim == 4 and images.is_floating_point():
        x = images.detach().float().cpu()  # already the project's [-1, 1] convention
    else:
        x = to_uint8_batch(images).float() / 127.5 - 1
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def classify_digits(images, batch_size: int = 256, model: DigitClassifier | None = None) -> Tensor:
    """Predicted digit [N] for images: a float tensor [N, C, H, W] in [-1, 1], a uint8 one, or a list of
    HxWx3 uint8 arrays / PIL images. Any size; they are resized to the classifier's 32x32."""
    model = model or load_digit_classifier()
    x = _to_model_input(images, model.config.image_size)
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def digit_alignment(prompts: Sequence[str], images, model: DigitClassifier | None = None) -> dict:
    """Fraction of images whose predicted digit is the one their prompt names.

    Prompts naming no digit (or several) are left out and counted in "skipped".
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    wanted = [parse_digit(p) for p in prompts]
    keep = [i for i, d in enumerate(wanted) if d is not None]
    if not keep:
        raise ValueError("none of the prompts names a single digit (see ernielab.worlds.mnist.parse_digit)")
    if isinstance(images, Tensor):
        kept_images = images[keep]
    else:
        kept_images = [images[i] for i in keep]
    predicted = classify_digits(kept_images, model=model)
    target = torch.tensor([wanted[i] for i in keep])
    return {
        "n": len(keep),
        "accuracy": (predicted == target).float().mean().item(),
        "skipped": len(prompts) - len(keep),
    }
