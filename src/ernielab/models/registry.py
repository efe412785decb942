"""Load whatever denoiser a pipeline folder holds, by the files it contains."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Each loader: (predicate on the folder, loader). The first whose predicate holds is used; the plain
# ErnieImageTransformer (ernielab or diffusers folder) is the fallback. Other model families register here.
LOADERS: list[tuple] = []


def register_loader(predicate, loader) -> None:
    LOADERS.append((predicate, loader))


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    path = Path(path)
    for predicate, loader in LOADERS:
        if predicate(path):
            return loader(path, dtype)
    from .image import ErnieImageTransformer

    return ErnieImageTransformer.from_pretrained(path, dtype=dtype)


from ..diffusion import experts as _experts  # noqa: E402,F401  registers the mixture-of-denoising-experts loader
