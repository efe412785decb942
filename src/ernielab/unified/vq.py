"""A small VQ image tokenizer: patch conv encoder -> nearest codebook vector -> conv decoder.

The codebook is learned by exponential moving averages of the encoder outputs assigned to each code
(online k-means, as in VQ-VAE-2) rather than by a codebook loss; codes that fall out of use are
restarted on random encoder outputs of the current batch, so a small codebook stays fully used.
Images are float [B, 3, H, W] in [-1, 1]; codes are int64 [B, grid, grid].

With `config.scales` (e.g. 1, 2, 4, 8) the tokenizer is a multi-scale residual quantiser, as in VAR (Tian et
al. 2024), the tokenizer behind next-scale prediction: scale k quantises the area-downsampled residual that
the bicubic-upsampled coarser scales leave of the encoder output, all scales share one codebook, and the
decoder reads the sum of every scale's upsampled code vectors. As in VAR, the commitment term averages over
the partial sums (the encoder output is pulled toward the reconstruction after each scale, not only the last
one; committing to the last one alone diverged within 500 steps here). Its codes are int64 [B, n_scales, grid, grid]:
scale k fills the top-left side_k x side_k corner and the rest is -1 (`NO_CODE`), so a code tensor says which
scales it holds. VAR's per-scale refinement convolutions are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.unified.config import VQConfig


def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class EMAQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, decay: float, dead_after: float = 0.03):
        super().__init__()
        self.decay, self.dead_after = decay, dead_after
        self.register_buffer("embed", torch.randn(num_codes, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, d] -> nearest code ids [N]."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return dist.argmin(1)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        num_codes = self.embed.shape[0]
        if not self.initialized:  # start from data, not noise
            pick = torch.randint(0, z.shape[0], (num_codes,), device=z.device)
            self.embed.copy_(z[pick])
            self.embed_sum.copy_(z[pick])
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
            return
        onehot = F.one_hot(codes, num_codes).to(z.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        self.embed.copy_(self.embed_sum / self.cluster_size.clamp_min(1e-5)[:, None])
        dead = self.cluster_size < self.dead_after
        if dead.any():
            pick = torch.randint(0, z.shape[0], (int(dead.sum()),), device=z.device)
            self.embed[dead] = z[pick]
            self.embed_sum[dead] = z[pick]
            self.cluster_size[dead] = 1.0

    def forward(self, z: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, d] -> (quantised z with straight-through gradient, codes [N]); update = EMA step."""
        codes = self.codes(z.detach())
        if update:
            self._update(z.detach(), codes)
            codes = self.codes(z.detach())
        quant = self.embed[codes]
        return z + (quant - z).detach(), codes


NO_CODE = -1  # the cells of a multi-scale code tensor beyond a scale's side


def scales_of(codes: torch.Tensor) -> tuple[int, ...]:
    """The sides of a multi-scale code tensor [..., n_scales, grid, grid] (read from its first item)."""
    first = codes.reshape(-1, *codes.shape[-3:])[0]
    return tuple(int((scale[:, 0] != NO_CODE).sum()) for scale in first)


def pack_scales(per_scale: list[torch.Tensor], grid: int) -> torch.Tensor:
    """Codes [B, side_k, side_k] per scale -> [B, n_scales, grid, grid], NO_CODE beyond each side."""
    out = per_scale[0].new_full((per_scale[0].shape[0], len(per_scale), grid, grid), NO_CODE)
    for k, codes in enumerate(per_scale):
        out[:, k, : codes.shape[1], : codes.shape[2]] = codes
    return out


def upsample(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, d, n, n] -> [B, d, side, side], bicubic (VAR's choice); identity at equal size."""
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


class VQTokenizer(nn.Module):
    """Patch encoder (one token per patch, 3x3 convs for context at token resolution), EMA codebook, and
    the mirror decoder ending in a transposed patch convolution. All heavy work happens on the token
    grid, which keeps training cheap on a CPU."""

    def __init__(self, config: VQConfig):
        super().__init__()
        config.validate()
        self.config = config
        c, p = config.hidden, config.patch_size
        enc: list[nn.Module] = [nn.Conv2d(3, c, p, stride=p)]
        for _ in range(config.context_layers):
            enc += [nn.SiLU(), conv(c, c)]
        enc += [nn.SiLU(), nn.Conv2d(c, config.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.code_dim, c, 1)]
        for _ in range(config.context_layers):
            dec += [nn.SiLU(), conv(c, c)]
        dec += [nn.SiLU(), nn.Conv2d(c, c, 1), nn.SiLU(), nn.ConvTranspose2d(c, 3, p, stride=p)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = EMAQuantizer(config.codebook_size, config.code_dim, config.ema_decay)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"VQ tokenizer expects images [B, 3, {size}, {size}], got {tuple(images.shape)}")

    def _quantize(self, images: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_images(images)
        z = self.encoder(images)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        quant, codes = self.quantizer(flat, update)
        return flat, quant, codes.view(b, h, w)

    # ---- multi-scale residual quantisation ----------------------------------------------------------
    def _residual_codes(self, z: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """z [B, d, g, g] -> (codes [B, side, side] per scale, the reconstruction of z after each scale, the
        quantised residual vectors [N_k, d] per scale)."""
        b, d, g, _ = z.shape
        z_hat, codes, partial, residuals = torch.zeros_like(z), [], [], []
        for side in self.config.scales:
            residual = F.interpolate(z - z_hat, size=(side, side), mode="area")
            flat = residual.permute(0, 2, 3, 1).reshape(-1, d)
            ids = self.quantizer.codes(flat)
            z_hat = z_hat + upsample(self.quantizer.embed[ids].view(b, side, side, d).permute(0, 3, 1, 2), g)
            codes.append(ids.view(b, side, side))
            partial.append(z_hat)
            residuals.append(flat)
        return codes, partial, residuals

    def _quantize_scales(self, images: torch.Tensor, update: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """-> (z, its reconstruction with straight-through gradient, codes [B, n_scales, g, g], the partial
        reconstructions); update = one EMA step on every scale's residuals (one step, so that the decay means
        what it means for one scale)."""
        self._check_images(images)
        z = self.encoder(images)
        if update:
            _, _, residuals = self._residual_codes(z.detach())
            flat = torch.cat(residuals)
            self.quantizer._update(flat, self.quantizer.codes(flat))
        codes, partial, _ = self._residual_codes(z.detach())
        return z, z + (partial[-1] - z).detach(), pack_scales(codes, self.config.grid), partial

    def _check_scale_codes(self, codes: torch.Tensor) -> None:
        g, scales = self.config.grid, self.config.scales
        if codes.ndim != 4 or codes.shape[1:] != (len(scales), g, g) or scales_of(codes) != scales:
            raise ValueError(f"multi-scale VQ decoder expects codes [B, {len(scales)}, {g}, {g}] holding scales "
                             f"{list(scales)}, got {tuple(codes.shape)}")
        used = torch.cat([codes[:, k, :side, :side].flatten() for k, side in enumerate(scales)])
        if used.min() < 0 or used.max() >= self.config.codebook_size:
            raise ValueError(f"code ids must lie in [0, {self.config.codebook_size})")

    def latent(self, codes: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """Multi-scale codes -> the decoder's input [B, d, g, g] from the first num_scales scales (all: None)."""
        self._check_scale_codes(codes)
        b, g, d = codes.shape[0], self.config.grid, self.config.code_dim
        z_hat = self.quantizer.embed.new_zeros(b, d, g, g)
        for k, side in enumerate(self.config.scales[:num_scales]):
            vectors = self.quantizer.embed[codes[:, k, :side, :side]].permute(0, 3, 1, 2)
            z_hat = z_hat + upsample(vectors, g)
        return z_hat

    # ---- public ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes [B, grid, grid] (multi-scale: [B, n_scales, grid, grid])."""
        if self.config.scales:
            return self._quantize_scales(images, update=False)[2]
        return self._quantize(images)[2]

    @torch.no_grad()
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder output [B, d, g, g] that the codes quantise."""
        self._check_images(images)
        return self.encoder(images)

    def decode(self, codes: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """codes [B, grid, grid] -> images [B, 3, H, W] (unclamped). Multi-scale codes [B, n_scales, grid, grid]:
        num_scales decodes the first scales only (None: all)."""
        if self.config.scales:
            return self.decoder(self.latent(codes, num_scales))
        g = self.config.grid
        if codes.ndim != 3 or codes.shape[1:] != (g, g):
            raise ValueError(f"VQ decoder expects codes [B, {g}, {g}], got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(f"code ids must lie in [0, {self.config.codebook_size})")
        quant = self.quantizer.embed[codes]  # [B, g, g, d]
        return self.decoder(quant.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (reconstruction, {"loss", "recon", "commit", "codes"})."""
        if self.config.scales:
            z, quant, codes, partial = self._quantize_scales(images, update=self.training)
            recon = self.decoder(quant)
            commit = torch.stack([F.mse_loss(z, z_hat) for z_hat in partial]).mean()
        else:
            flat, quant, codes = self._quantize(images, update=self.training)
            b, g = images.shape[0], self.config.grid
            recon = self.decoder(quant.view(b, g, g, -1).permute(0, 3, 1, 2))
            commit = F.mse_loss(flat, quant.detach())
        rec_loss = F.mse_loss(recon, images)
        loss = rec_loss + self.config.commitment * commit
        return recon, {"loss": loss, "recon": rec_loss.detach(), "commit": commit.detach(), "codes": codes}


def psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (after clamping the reconstruction)."""
    mse = F.mse_loss(recon.clamp(-1, 1), images).item() / 4.0  # [-1, 1] -> [0, 1] scale
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))
