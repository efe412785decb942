"""ERNIE-Image: single-stream DiT."""
from .config import PRESETS, ErnieImageConfig, check_interchangeable
from .transformer import ErnieImageTransformer

__all__ = ["ErnieImageConfig", "ErnieImageTransformer", "PRESETS", "check_interchangeable"]
