"""Configs for the long-sequence classifiers: dense Transformer, BigBird-style and ERNIE-Sparse HST."""
from __future__ import annotations

import dataclasses
import math

from ernielab.core.config import Config

ATTENTION_MODES = ("dense", "bigbird", "hst")
POS_ENCODINGS = ("learned", "sincos-2d")


@dataclasses.dataclass
class SparseClassifierConfig(Config):
    vocab_size: int = 16
    num_classes: int = 10
    max_len: int = 2000
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    qk_norm: bool = True
    attention: str = "hst"  # "dense" | "bigbird" | "hst"
    block_size: int = 64
    window: int = 1  # neighbour blocks on each side of a query block
    num_global: int = 8  # HST representative tokens / BigBird global tokens
    num_random_blocks: int = 3  # BigBird only
    sar_alpha: float = 0.0  # HST only: weight of the symmetric KL between sparse and dense topologies
    # SAR variant: the dense run also gets the task loss (the two cross-entropies are averaged), so the
    # topology the sparse one is pulled towards is itself trained on the labels (R-Drop's form)
    sar_dense_ce: bool = False
    seed: int = 0  # fixes BigBird's random block pattern
    # "learned": one trained vector per position. "sincos-2d": fixed sine/cosine codes of (row, column)
    # for row-major images `image_width` pixels wide, so every model starts knowing which pixels touch.
    pos_encoding: str = "learned"
    image_width: int = 0

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.num_heads} heads")
        if min(self.vocab_size, self.num_classes, self.max_len, self.depth, self.block_size) < 1:
            raise ValueError("vocab_size, num_classes, max_len, depth and block_size must be >= 1")
        if self.attention != "dense" and self.num_global < 1:
            raise ValueError(f"{self.attention} attention needs num_global >= 1")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.pos_encoding == "sincos-2d" and (self.image_width < 1 or self.dim % 4):
            raise ValueError("pos_encoding 'sincos-2d' needs image_width >= 1 and dim divisible by 4")
        if self.sar_alpha < 0:
            raise ValueError(f"sar_alpha must be >= 0, got {self.sar_alpha}")
        if self.sar_alpha > 0 and self.attention != "hst":
            raise ValueError("SAR (sar_alpha > 0) regularises the HST topology; set attention='hst'")
        if self.sar_dense_ce and self.sar_alpha <= 0:
            raise ValueError("sar_dense_ce is a SAR variant: it needs sar_alpha > 0")

    @property
    def padded_len(self) -> int:
        """max_len rounded up to whole blocks (sparse modes pad every batch to whole blocks)."""
        return math.ceil(self.max_len / self.block_size) * self.block_size

    @property
    def num_prefix(self) -> int:
        """Learned tokens placed before the sequence: BigBird globals or HST representatives."""
        return 0 if self.attention == "dense" else self.num_global

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """Unit-test size."""
        base = dict(vocab_size=16, num_classes=10, max_len=64, dim=32, depth=2, num_heads=2, mlp_dim=64,
                    block_size=8, window=1, num_global=2, num_random_blocks=1)
        return cls(attention=attention, **{**base, **kw})

    @classmethod
    def cpu_listops(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """CPU-budget ListOps (max length 512) used by benchmarks/sparse_lra.py."""
        base = dict(vocab_size=16, num_classes=10, max_len=512, dim=64, depth=2, num_heads=4, mlp_dim=128,
                    dropout=0.0, block_size=32, window=1, num_global=8, num_random_blocks=2)
        return cls(attention=attention, **{**base, **kw})

    @classmethod
    def cpu_pathfinder(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """CPU-budget Pathfinder 32x32 (1024 pixel tokens)."""
        base = dict(vocab_size=257, num_classes=2, max_len=1024, dim=64, depth=2, num_heads=4, mlp_dim=128,
                    dropout=0.0, block_size=32, window=1, num_global=8, num_random_blocks=2)
        return cls(attention=attention, **{**base, **kw})

    @classmethod
    def lra_listops(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """LRA ListOps model size (6 layers, 512 wide, 8 heads, MLP 2048, length 2000)."""
        base = dict(vocab_size=16, num_classes=10, max_len=2000, dim=512, depth=6, num_heads=8, mlp_dim=2048,
                    dropout=0.1, block_size=64, window=1, num_global=16, num_random_blocks=3)
        return cls(attention=attention, **{**base, **kw})

    @classmethod
    def lra_pathfinder(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """LRA Pathfinder-32 transformer size (1 layer, 128 wide, 4 heads, MLP 128, 1024 pixels)."""
        base = dict(vocab_size=257, num_classes=2, max_len=1024, dim=128, depth=1, num_heads=4, mlp_dim=128,
                    dropout=0.2, block_size=64, window=1, num_global=16, num_random_blocks=3)
        return cls(attention=attention, **{**base, **kw})

    @classmethod
    def lra_text(cls, attention: str = "hst", **kw) -> "SparseClassifierConfig":
        """LRA byte-level text size (4 layers, 256 wide, 4 heads, MLP 1024; 4K bytes as in the LRA paper)."""
        base = dict(vocab_size=257, num_classes=2, max_len=4000, dim=256, depth=4, num_heads=4, mlp_dim=1024,
                    dropout=0.1, block_size=64, window=1, num_global=16, num_random_blocks=3)
        return cls(attention=attention, **{**base, **kw})


PRESETS = {
    "tiny": SparseClassifierConfig.tiny,
    "cpu-listops": SparseClassifierConfig.cpu_listops,
    "cpu-pathfinder": SparseClassifierConfig.cpu_pathfinder,
    "lra-listops": SparseClassifierConfig.lra_listops,
    "lra-pathfinder": SparseClassifierConfig.lra_pathfinder,
    "lra-text": SparseClassifierConfig.lra_text,
}
