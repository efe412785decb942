"""Sequence classifier with dense, BigBird-style or hierarchical sparse (HST) attention.

Learned prefix tokens (BigBird globals / HST representatives) sit in front of the sequence; the
classifier mean-pools the valid sequence tokens. One set of weights runs under the sparse topology
(training and inference) or, for HST, under the dense topology used by SAR.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ernielab.core.layers.mlp import MLP
from ernielab.core.layers.norms import RMSNorm
from ernielab.sparse.attention import SparseSelfAttention
from ernielab.sparse.config import SparseClassifierConfig

PAD_ID = 0
TOPOLOGIES = ("sparse", "dense")


def sincos_2d(length: int, width: int, dim: int) -> torch.Tensor:
    """[length, dim] fixed codes of row-major pixel positions: the first half of the channels encodes
    the row, the second half the column, each as sines and cosines of dim/4 frequencies (as in ViT/MAE).
    Neighbouring pixels get similar codes in both directions, which a 1-D position table must learn.
    Unlike ViT's base-10000 frequencies (made for long ranges), the wavelengths run geometrically from
    4 pixels to twice the image width: no channel is constant across a small image and the longest
    wave never wraps, so code distance grows with pixel distance."""
    wavelengths = torch.logspace(math.log10(4.0), math.log10(max(4.0, 2.0 * width)), dim // 4, dtype=torch.float64)
    freqs = 2 * math.pi / wavelengths
    pos = torch.arange(length)
    codes = []
    for coord in (pos // width, pos % width):
        angles = coord.double()[:, None] * freqs[None]
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1).float()


class SparseBlock(nn.Module):
    """Pre-norm block: attention under the configured topology, then a GELU MLP on every token."""

    def __init__(self, cfg: SparseClassifierConfig, layer: int):
        super().__init__()
        self.mode = cfg.attention
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = SparseSelfAttention(
            cfg.dim, cfg.num_heads, cfg.block_size, cfg.window,
            num_random_blocks=cfg.num_random_blocks if cfg.attention == "bigbird" else 0,
            qk_norm=cfg.qk_norm, dropout=cfg.dropout, seed=cfg.seed * 1000 + layer,
            max_blocks=cfg.padded_len // cfg.block_size,
        )
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, prefix: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, dense: bool):
        """prefix [B, g, D], seq [B, n, D], valid [B, n] -> updated (prefix, seq)."""
        g = prefix.shape[1]
        if self.mode == "hst":
            prefix, seq = self.attn.hierarchical(prefix, seq, valid, self.norm1, dense=dense)
            x = torch.cat([prefix, seq], dim=1)
        else:
            x = torch.cat([prefix, seq], dim=1)
            full_valid = torch.cat([valid.new_ones(valid.shape[0], g), valid], dim=1)
            h = self.norm1(x)
            x = x + (self.attn.dense(h, full_valid) if dense else self.attn.bigbird(h, full_valid, g))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x[:, :g], x[:, g:]


class SparseClassifier(nn.Module):
    def __init__(self, cfg: SparseClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(cfg.padded_len, cfg.dim))
        else:  # fixed codes: not saved, rebuilt from the config
            # scaled to the 0.02 RMS of the learned table's initialisation, so the pixel embeddings are
            # not drowned out at the start; only the content of the codes differs between the two options
            codes = sincos_2d(cfg.padded_len, cfg.image_width, cfg.dim) * (0.02 * math.sqrt(2))
            self.register_buffer("pos_emb", codes, persistent=False)
        self.prefix = nn.Parameter(torch.zeros(cfg.num_prefix, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SparseBlock(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        self.head = MLP(cfg.dim, cfg.dim, cfg.num_classes)
        learned = (self.pos_emb,) if cfg.pos_encoding == "learned" else ()
        for p in (self.token_emb.weight, *learned, self.prefix):
            nn.init.normal_(p, std=0.02)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices only; norms, biases, the position table and the prefix tokens
        are left alone."""
        decay, rest = [], []
        for name, p in self.named_parameters():
            (decay if p.ndim >= 2 and name not in ("pos_emb", "prefix") else rest).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, topology: str = "sparse"):
        """tokens [B, S] int (PAD_ID = padding), valid [B, S] bool (default tokens != PAD_ID) -> logits [B, C]."""
        cfg = self.cfg
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {cfg.max_len}")
        if valid is None:
            valid = tokens != PAD_ID
        if cfg.attention != "dense":  # sparse topologies work on whole blocks: pad and mask the tail
            pad = -tokens.shape[1] % cfg.block_size
            tokens = nn.functional.pad(tokens, (0, pad), value=PAD_ID)
            valid = nn.functional.pad(valid, (0, pad), value=False)
        batch, length = tokens.shape
        seq = self.drop(self.token_emb(tokens) + self.pos_emb[:length])
        prefix = self.prefix.expand(batch, -1, -1)
        dense = topology == "dense" or cfg.attention == "dense"
        for block in self.blocks:
            prefix, seq = block(prefix, seq, valid, dense)
        seq = self.norm(seq)
        weights = valid.to(seq.dtype)[..., None]
        pooled = (seq * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)
