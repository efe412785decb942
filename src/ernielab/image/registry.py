"""Load whatever denoiser a pipeline folder holds, by the files it contains."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

# Families whose denoisers can stand in a pipeline's transformer/ folder, named as "module:predicate:loader" so
# that this module never imports a family above it; each is imported only when a folder is loaded.
FAMILY_LOADERS = ["ernielab.vilg.experts:is_mode_folder:load_mode_folder"]


def _loaders():
    for spec in FAMILY_LOADERS:
        module, predicate, loader = spec.split(":")
        mod = importlib.import_module(module)
        yield getattr(mod, predicate), getattr(mod, loader)


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The first family loader whose predicate holds, else the plain ErnieImageTransformer (ernielab or
    diffusers folder)."""
    path = Path(path)
    for predicate, loader in _loaders():
        if predicate(path):
            return loader(path, dtype)
    from ernielab.image.transformer import ErnieImageTransformer

    return ErnieImageTransformer.from_pretrained(path, dtype=dtype)
