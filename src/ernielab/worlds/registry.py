"""One entry point to every image-caption dataset, chosen by a serialisable DataConfig."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ernielab.core.config import Config, bounded


@dataclasses.dataclass
class DataConfig(Config):
    kind: str = bounded("shapes", choices=("shapes", "mnist", "folder"))
    path: str = ""  # folder: a folder of images with .txt captions, or a JSONL file
    size: int = bounded(1_000_000, ge=1)  # shapes: number of distinct procedural samples
    image_size: int = bounded(32, ge=1)
    seed: int = 0
    split: str = bounded("train", choices=("train", "val", "test"))
    kind_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # shapes: scene-kind mix; empty = default 0.4/0.2/0.4
    # shapes: caption wording mix over worlds.phrasing.STYLES; empty = today's templates only
    caption_styles: dict[str, float] = dataclasses.field(default_factory=dict)
    # shapes: "colour shape relation" combinations no scene shows, e.g. "red triangle left of"
    holdout_combinations: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        if self.kind != "shapes" and (self.caption_styles or self.holdout_combinations):
            raise ValueError("caption_styles and holdout_combinations apply to kind 'shapes' only")
        if self.caption_styles:
            from ernielab.worlds.phrasing import check_style_weights

            try:
                check_style_weights(self.caption_styles)
            except ValueError as e:
                raise ValueError(f"caption_styles: {e}") from None
        from ernielab.worlds.shapes import parse_combinations

        try:
            parse_combinations(self.holdout_combinations)
        except ValueError as e:
            raise ValueError(f"holdout_combinations: {e}") from None
        if self.kind == "folder" and not self.path:
            raise ValueError("data.kind 'folder' needs data.path (a folder of images or a .jsonl file)")
        if self.kind == "folder" and not Path(self.path).exists():
            raise ValueError(f"data.path {self.path} does not exist")


def check_data(config: DataConfig) -> None:
    config.validate("data")


def build_dataset(config: DataConfig):
    if config.kind == "shapes":
        from ernielab.worlds.shapes import ShapesWorld

        return ShapesWorld(config.size, image_size=config.image_size, seed=config.seed, split=config.split,
                           kinds=config.kind_weights or None, caption_styles=config.caption_styles,
                           holdout_combinations=config.holdout_combinations)
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
