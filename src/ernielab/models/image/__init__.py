"""ERNIE-Image: single-stream DiT."""
from .config import PRESETS, ErnieImageConfig
from .transformer import ErnieImageTransformer

__all__ = ["ErnieImageConfig", "ErnieImageTransformer", "PRESETS"]
