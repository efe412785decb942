"""One entry point to every image-caption dataset, chosen by a serialisable DataConfig."""
from __future__ import annotations

import dataclasses

from ernielab.core.config import Config


@dataclasses.dataclass
class DataConfig(Config):
    kind: str = "shapes"  # "shapes" | "mnist" | "folder"
    path: str = ""  # folder: a folder of images with .txt captions, or a JSONL file
    size: int = 1_000_000  # shapes: number of distinct procedural samples
    image_size: int = 32
    seed: int = 0
    split: str = "train"
    kind_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # shapes: scene-kind mix; empty = default 0.4/0.2/0.4


def build_dataset(config: DataConfig):
    if config.kind == "shapes":
        from ernielab.worlds.shapes import ShapesWorld

        return ShapesWorld(config.size, image_size=config.image_size, seed=config.seed, split=config.split,
                           kinds=config.kind_weights or None)
    if config.kind == "mnist":
        from ernielab.worlds.mnist import CaptionedMNIST

        return CaptionedMNIST(split=config.split, image_size=config.image_size, seed=config.seed)
    if config.kind == "folder":
        from ernielab.worlds.folder import ImageCaptionFolder

        if not config.path:
            raise ValueError("data.kind='folder' needs data.path (a folder or a .jsonl file)")
        return ImageCaptionFolder(config.path, image_size=config.image_size)
    raise ValueError(f"unknown dataset kind {config.kind!r} (use 'shapes', 'mnist' or 'folder')")


def collate(batch: list[dict]) -> dict:
    """Stack tensors that share a shape; keep everything else as lists (boxes, scenes, captions)."""
    import torch

    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
