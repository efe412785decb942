"""Your own image-caption pairs, from a JSONL file or a folder of images with same-stem .txt captions.

JSONL, one object a line (blank lines are skipped; relative paths are relative to the JSONL's folder):

    {"image": "cats/0001.png", "caption": "a cat on a sofa"}

Folder: `photo.jpg` + `photo.txt` (searched recursively). Every problem is reported with the file
(and JSONL line) it comes from, when the dataset is built rather than mid-training where possible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Record:
    image: Path
    caption: str
    where: str  # "data.jsonl:12" or the caption file, for error messages


def jsonl_lines(path: Path) -> list[tuple[str, str]]:
    """The non-blank lines of a JSON-lines file, each with its "file:line" for error messages."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file; expected JSON lines") from None
    return [(f"{path}:{number}", line) for number, line in enumerate(lines, start=1) if line.strip()]


def jsonl_objects(path: Path, expected: str = "a JSON object") -> list[tuple[str, dict]]:
    """Each non-blank line of a JSON-lines file parsed as a JSON object, with its "file:line"; a line that is not
    valid JSON, or not an object (`expected` says what it should be), is a ValueError naming the line."""
    objects = []
    for where, line in jsonl_lines(path):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected {expected}, got {type(entry).__name__}")
        objects.append((where, entry))
    return objects


def read_jsonl(path: Path) -> list[Record]:
    records = []
    for where, entry in jsonl_objects(path, "a JSON object with 'image' and 'caption'"):
        missing = [key for key in ("image", "caption") if key not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; each line needs 'image' and 'caption'")
        if not isinstance(entry["image"], str) or not isinstance(entry["caption"], str):
            raise ValueError(f"{where}: 'image' and 'caption' must be strings")
        records.append(Record(path.parent / entry["image"], entry["caption"], where))
    return records


def read_folder(root: Path) -> list[Record]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    without = [p for p in images if not p.with_suffix(".txt").is_file()]
    if without:
        shown = ", ".join(str(p) for p in without[:5]) + (" ..." if len(without) > 5 else "")
        raise ValueError(f"{len(without)} image(s) in {root} have no same-stem .txt caption: {shown}")
    records = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{caption_file}: caption file is not UTF-8 text") from None
        records.append(Record(image, caption, str(caption_file)))
    return records


def load_rgb(path: Path) -> Image.Image:
    """RGB image with EXIF rotation applied; transparency is composited over white."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the central size x size square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width (aspect kept), then the central height x width crop (aspect buckets)."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def oriented_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as `load_rgb` returns it (EXIF rotation applied), read from its header."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return height, width


def to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return pixels.permute(2, 0, 1).contiguous()


class ImageCaptionFolder(Dataset):
    """Items: {"image": float32 [3, S, S] in [-1, 1], "caption": str} from a .jsonl file or a folder.

    Missing images are found when the dataset is built; with `check_images` every image header is
    also opened then, so unreadable files fail early instead of mid-training.
    """

    def __init__(self, source: str | Path, image_size: int = 256, check_images: bool = True) -> None:
        source = Path(source)
        if source.is_dir():
            self.records = read_folder(source)
        elif source.is_file():
            self.records = read_jsonl(source)
        else:
            raise FileNotFoundError(f"dataset source not found: {source} (give a .jsonl file or a folder)")
        if not self.records:
            raise ValueError(f"dataset {source} is empty: no image-caption pairs found")
        for record in self.records:
            if not record.image.is_file():
                raise FileNotFoundError(f"{record.where}: image file not found: {record.image}")
            if check_images:
                try:
                    with Image.open(record.image):  # reads the header only; decoding waits for __getitem__
                        pass
                except (UnidentifiedImageError, OSError) as e:
                    raise ValueError(f"{record.where}: cannot read image {record.image}: {e}") from None
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        try:
            image = resize_center_crop(load_rgb(record.image), self.image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{record.where}: cannot read image {record.image}: {e}") from None
        return {"image": to_tensor(image), "caption": record.caption}

    def item(self, i: int, height: int, width: int) -> dict:
        """Item i resized to cover height x width and centre-cropped to it (an aspect-ratio bucket)."""
        record = self.records[i]
        try:
            image = resize_crop(load_rgb(record.image), height, width)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{record.where}: cannot read image {record.image}: {e}") from None
        return {"image": to_tensor(image), "caption": record.caption}

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, EXIF rotation applied (headers only)."""
        sizes = []
        for record in self.records:
            try:
                sizes.append(oriented_size(record.image))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{record.where}: cannot read image {record.image}: {e}") from None
        return sizes
