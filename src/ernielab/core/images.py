"""Image helpers every family shares: tensor <-> uint8/PIL conversions (uint8 HxWx3 is the common form) and
contact sheets (a grid of images with short captions, for eyeballing samples)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 96  # small images are upscaled by an integer factor to at least this many pixels
MAX_CAPTION_LINES = 3
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def to_uint8_image(image) -> np.ndarray:
    """HxWx3 uint8 array from a PIL image, an HxW(x3) uint8 array, or a tensor [C, H, W] (float in [-1, 1] or uint8)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor [C, H, W] with C in (1, 3), got {tuple(x.shape)}")
        if x.is_floating_point():  # the project's convention: [-1, 1]
            x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        elif x.dtype != torch.uint8:
            raise ValueError(f"image tensors must be float in [-1, 1] or uint8, got {x.dtype}")
        return x.expand(3, -1, -1).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 HxWx3, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image arrays must be HxW or HxWx3, got shape {array.shape}")
    return array


def to_uint8_batch(images) -> torch.Tensor:
    """uint8 tensor [N, 3, H, W] from a tensor [N, C, H, W] (uint8, or float in [-1, 1]) or a list of images."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
        images = torch.from_numpy(images)  # NCHW array; NHWC arrays go through the list path
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        if images.is_floating_point():
            images = ((images.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        elif images.dtype != torch.uint8:
            raise ValueError(f"image tensors must be float in [-1, 1] or uint8, got {images.dtype}")
        return images.expand(-1, 3, -1, -1).contiguous()
    arrays = []
    for i, image in enumerate(images):
        try:
            array = to_uint8_image(image)
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from None
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"image {i} has shape {array.shape} but image 0 has {arrays[0].shape}: sizes must match")
        arrays.append(array)
    if not arrays:
        raise ValueError("no images given")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Scale to fit a cell x cell box, keeping the aspect ratio; nearest neighbour when enlarging keeps pixels crisp."""
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return image.resize(size, resample) if size != image.size else image


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most MAX_CAPTION_LINES lines ("..." marks a cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the cell
            cut = max(1, int(len(word) * width / draw.textlength(word, font=font)))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > MAX_CAPTION_LINES:
        lines = lines[:MAX_CAPTION_LINES]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def contact_sheet(
    images: Sequence, captions: Sequence[str] | None = None, cols: int | None = None,
    cell: int | None = None, pad: int = 2,
) -> Image.Image:
    """Grid of `images` (uint8 HxWx3 arrays, PIL images, or tensors in [-1, 1]) with optional captions below.

    `cell` is the side of each square image cell in pixels; by default the largest image is
    upscaled by the smallest integer factor reaching MIN_CELL. Layout: `pad` pixels around every
    cell; width = cols * cell + (cols + 1) * pad.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    arrays = [to_uint8_image(im) for im in images]
    if not arrays:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(arrays):
        raise ValueError(f"got {len(arrays)} images but {len(captions)} captions")
    n = len(arrays)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    if cell is None:
        side = max(max(a.shape[:2]) for a in arrays)
        cell = side * max(1, math.ceil(MIN_CELL / side))

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(str(c), measure, font, cell) for c in captions] if captions is not None else []
    bbox = font.getbbox("Ag")
    line_height = bbox[3] + 2
    caption_height = max((len(lines) for lines in wrapped), default=0) * line_height
    caption_height += pad if caption_height else 0

    width = cols * cell + (cols + 1) * pad
    height = rows * (cell + caption_height) + (rows + 1) * pad
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, array in enumerate(arrays):
        row, col = divmod(i, cols)
        x = pad + col * (cell + pad)
        y = pad + row * (cell + caption_height + pad)
        tile = _fit(Image.fromarray(array), cell)
        sheet.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + cell + pad + j * line_height), line, fill=TEXT_COLOR, font=font)
    return sheet


def save_grid(images: Sequence, path: str | Path, captions: Sequence[str] | None = None, **kwargs) -> Path:
    """Write `contact_sheet(images, captions, **kwargs)` to `path` (format from the suffix); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(images, captions, **kwargs).save(path)
    return path
