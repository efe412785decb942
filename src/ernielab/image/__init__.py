"""ERNIE-Image: single-stream DiT."""
from ernielab.image.config import PRESETS, ErnieImageConfig, check_interchangeable
from ernielab.image.transformer import ErnieImageTransformer

__all__ = ["ErnieImageConfig", "ErnieImageTransformer", "PRESETS", "check_interchangeable"]
