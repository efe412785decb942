"""ERNIE-Image transformer configs. Field names follow diffusers' ErnieImageTransformer2DModel config."""
from __future__ import annotations

import dataclasses
from typing import Any

from ernielab.core.config import Config


@dataclasses.dataclass
class ErnieImageConfig(Config):
    hidden_size: int = 3072
    num_attention_heads: int = 24
    num_layers: int = 24
    ffn_hidden_size: int = 8192
    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    text_in_dim: int = 2560
    rope_theta: int = 256
    rope_axes_dim: tuple[int, int, int] = (32, 48, 48)
    eps: float = 1e-6
    qk_layernorm: bool = True

    def __post_init__(self):
        self.rope_axes_dim = tuple(self.rope_axes_dim)
        head_dim, rem = divmod(self.hidden_size, self.num_attention_heads)
        if rem:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if sum(self.rope_axes_dim) > head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be even and sum to <= head dim {head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "ErnieImageConfig":
        """Accept a diffusers config.json dict (drops the `_class_name`/`_diffusers_version` bookkeeping)."""
        return cls.from_dict({k: v for k, v in config.items() if not k.startswith("_")})

    def to_diffusers(self) -> dict[str, Any]:
        return {**self.to_dict(), "rope_axes_dim": list(self.rope_axes_dim)}

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def release(cls) -> "ErnieImageConfig":
        """The released ERNIE-Image 8B transformer (FLUX.2 VAE latents 2x2-patchified to 128 channels)."""
        return cls(hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288,
                   in_channels=128, out_channels=128, patch_size=1, text_in_dim=3072,
                   rope_theta=256, rope_axes_dim=(32, 48, 48), eps=1e-6)

    @classmethod
    def tiny(cls, in_channels: int = 48, text_in_dim: int = 384) -> "ErnieImageConfig":
        """Unit-test size: two layers, 64 hidden."""
        return cls(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=128,
                   in_channels=in_channels, out_channels=in_channels, patch_size=1, text_in_dim=text_in_dim,
                   rope_theta=256, rope_axes_dim=(4, 6, 6))

    @classmethod
    def small(cls, in_channels: int = 48, text_in_dim: int = 384) -> "ErnieImageConfig":
        """CPU-trainable size used for the bundled shapes-world model."""
        return cls(hidden_size=256, num_attention_heads=4, num_layers=8, ffn_hidden_size=640,
                   in_channels=in_channels, out_channels=in_channels, patch_size=1, text_in_dim=text_in_dim,
                   rope_theta=256, rope_axes_dim=(16, 24, 24))


PRESETS = {"release": ErnieImageConfig.release, "small": ErnieImageConfig.small, "tiny": ErnieImageConfig.tiny}


def check_interchangeable(reference, other, what: str) -> None:
    """Raise unless a denoiser with config `other` takes the same inputs and returns the same outputs as one with
    `reference` (latent channels in and out, text feature width), so either can denoise the other's latents.
    Duck-typed: MoDE configs expose the same three fields."""
    for name in ("in_channels", "out_channels", "text_in_dim"):
        if getattr(other, name) != getattr(reference, name):
            raise ValueError(f"{what}: {name} {getattr(other, name)} differs from {getattr(reference, name)}")
