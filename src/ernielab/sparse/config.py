"""Configs for the long-sequence classifiers: dense Transformer, BigBird-style and ERNIE-Sparse HST."""
from __future__ import annotations

import dataclasses
import math

from ernielab.core.config import Config, ConfigError, bounded

ATTENTION_MODES = ("dense", "bigbird", "hst")
POS_ENCODINGS = ("learned", "sincos-2d")


@dataclasses.dataclass
class SparseClassifierConfig(Config):
    vocab_size: int = bounded(16, ge=1)
    num_classes: int = bounded(10, ge=1)
    max_len: int = bounded(2000, ge=1)
    dim: int = bounded(64, ge=1)
    depth: int = bounded(2, ge=1)
    num_heads: int = bounded(4, ge=1)
    mlp_dim: int = bounded(128, ge=1)
    dropout: float = bounded(0.0, ge=0, lt=1)
    qk_norm: bool = True
    attention: str = bounded("hst", choices=ATTENTION_MODES)
    block_size: int = bounded(64, ge=1)
    window: int = bounded(1, ge=0)  # neighbour blocks on each side of a query block
    num_global: int = bounded(8, ge=0)  # HST representative tokens / BigBird global tokens
    num_random_blocks: int = bounded(3, ge=0)  # BigBird only
    sar_alpha: float = bounded(0.0, ge=0)  # HST only: weight of the symmetric KL between sparse and dense topologies
    # SAR variant: the dense run also gets the task loss (the two cross-entropies are averaged), so the
    # topology the sparse one is pulled towards is itself trained on the labels (R-Drop's form)
    sar_dense_ce: bool = False
    seed: int = 0  # fixes BigBird's random block pattern (the training seed is the training config's)
    # "learned": one trained vector per position. "sincos-2d": fixed sine/cosine codes of (row, column)
    # for row-major images `image_width` pixels wide, so every model starts knowing which pixels touch.
    pos_encoding: str = bounded("learned", choices=POS_ENCODINGS)
    image_width: int = bounded(0, ge=0)

    def __post_init__(self):
        # configs built in Python (presets, tests) are checked as strictly as loaded ones; a plain ValueError
        # lets `from_dict` name the section (e.g. "model: attention: must be one of ...")
        try:
            self.validate()
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def check(self) -> None:
        if self.num_heads >= 1 and self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.num_heads} heads")
        if self.attention != "dense" and self.num_global < 1:
            raise ValueError(f"{self.attention} attention needs num_global >= 1")
        if self.pos_encoding == "sincos-2d" and (self.image_width < 1 or self.dim % 4):
            raise ValueError("pos_encoding 'sincos-2d' needs image_width >= 1 and dim divisible by 4")
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
