"""Latent spaces behind one interface: encode images [-1, 1] -> latents the transformer sees, and back.

- PixelSpace: space-to-depth patchify of RGB pixels (small images; no autoencoder to train).
- DiffusersAutoencoder: any diffusers autoencoder (e.g. the FLUX.2 VAE of the release), with optional
  2x2 patchify and per-channel normalisation as the release does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ernielab.core.config import Config


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p], channel order (c, py, px) as the release's latent patchify."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (p * p), h * p, w * p)


@dataclasses.dataclass
class LatentSpaceConfig(Config):
    kind: str = "pixel"  # "pixel" | "diffusers"
    patch_size: int = 4  # pixel: space-to-depth factor; diffusers: latent patchify factor (release: 2)
    image_channels: int = 3
    vae_path: str = ""  # diffusers only: folder of a diffusers autoencoder
    scale: float = 1.0  # pixel space: latents = scale * pixels


class PixelSpace(nn.Module):
    def __init__(self, config: LatentSpaceConfig):
        super().__init__()
        self.config = config
        self.downsample = config.patch_size

    @property
    def channels(self) -> int:
        return self.config.image_channels * self.config.patch_size**2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} must be a multiple of {p}")
        return self.channels, height // p, width // p

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.config.patch_size) * self.config.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return unpatchify(latents / self.config.scale, self.config.patch_size).clamp(-1, 1)


class DiffusersAutoencoder(nn.Module):
    """Wraps a diffusers autoencoder: encode -> (patchify) -> normalise; decode inverts it."""

    def __init__(self, config: LatentSpaceConfig, vae: nn.Module | None = None):
        super().__init__()
        self.config = config
        if vae is None:
            vae = _load_diffusers_vae(config.vae_path)
        self.vae = vae.eval().requires_grad_(False)
        vc = self.vae.config
        self.latent_channels = vc.latent_channels
        self.downsample = 2 ** (len(vc.block_out_channels) - 1) * config.patch_size
        mean, std = self._stats()
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def _stats(self):
        c = self.latent_channels * self.config.patch_size**2
        bn = getattr(self.vae, "bn", None)
        if bn is not None and bn.running_mean.numel() == c:  # FLUX.2 VAE: BatchNorm stats over patchified latents
            return bn.running_mean.float(), torch.sqrt(bn.running_var.float() + 1e-5)
        vc = self.vae.config
        shift = getattr(vc, "shift_factor", None) or 0.0
        scale = getattr(vc, "scaling_factor", None) or 1.0
        return torch.full((c,), float(shift)), torch.full((c,), 1.0 / float(scale))

    @property
    def channels(self) -> int:
        return self.latent_channels * self.config.patch_size**2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be a multiple of {f}")
        return self.channels, height // f, width // f

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = patchify(dist.mode().float(), self.config.patch_size) if self.config.patch_size > 1 else dist.mode().float()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.std + self.mean
        if self.config.patch_size > 1:
            z = unpatchify(z, self.config.patch_size)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def _load_diffusers_vae(path: str) -> nn.Module:
    import json
    from pathlib import Path

    import diffusers

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no diffusers autoencoder at {path!r} (config.json missing)")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "AutoencoderKL")
    return getattr(diffusers, cls_name).from_pretrained(path)


def build_latent_space(config: LatentSpaceConfig, vae: nn.Module | None = None) -> nn.Module:
    if config.kind == "pixel":
        return PixelSpace(config)
    if config.kind == "diffusers":
        return DiffusersAutoencoder(config, vae)
    raise ValueError(f"unknown latent space kind {config.kind!r} (use 'pixel' or 'diffusers')")
