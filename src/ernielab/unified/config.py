"""Configs for the unified ERNIE 5.0-style model: VQ image tokenizer and the MoE transformer.

Tiny (unit tests), CPU (the measured table in docs/unified.md) and paper-flavoured sizes sit side by
side. The paper-flavoured sizes only illustrate the shape of the real thing (many small experts,
top-8 routing, a shared expert, deep and wide); ERNIE 5.0's exact dimensions are not reproduced here.
"""
from __future__ import annotations

import dataclasses

from ernielab.core.config import Config


@dataclasses.dataclass
class VQConfig(Config):
    image_size: int = 32
    patch_size: int = 4  # one token per patch: grid = image_size / patch_size
    hidden: int = 128  # conv channels at token resolution
    context_layers: int = 1  # 3x3 convs at token resolution (encoder and decoder each)
    code_dim: int = 16
    codebook_size: int = 256
    commitment: float = 0.25
    ema_decay: float = 0.95  # codebook vectors track their assigned encoder outputs (k-means style)

    def __post_init__(self):
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def tiny(cls, **kw) -> "VQConfig":
        return cls(**{**dict(image_size=16, patch_size=4, hidden=16, code_dim=4, codebook_size=16), **kw})

    @classmethod
    def cpu(cls, **kw) -> "VQConfig":
        return cls(**kw)


@dataclasses.dataclass
class UnifiedConfig(Config):
    # tokens
    text_vocab: tuple[int, ...] = ()  # WordPiece ids of the compact text vocabulary (see tokenizer.py)
    codebook_size: int = 256  # image vocabulary = the VQ codebook
    image_grid: int = 8  # image tokens form an image_grid x image_grid grid, decoded one row per step
    max_text_len: int = 32  # caption tokens incl. BOS / EOS
    # trunk
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    qk_norm: bool = True
    rope_theta: float = 10_000.0
    # feed-forward: MoE when dense_hidden == 0, else a dense GeGLU of that width (the baseline)
    num_experts: int = 16
    expert_hidden: int = 64
    top_k: int = 4
    shared_hidden: int = 64  # 0 = no shared expert
    balance_rate: float = 5e-3  # routing-bias step of the auxiliary-loss-free balancing
    dense_hidden: int = 0
    # multi-token prediction: extra heads predicting text tokens t+2 .. t+1+mtp_heads
    mtp_heads: int = 2
    # elastic sub-models are nested: a shallower model runs evenly spaced layers and a narrower one the
    # first experts, in training and in extraction (else: random subsets in training, cuts by usage)
    elastic_nested: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if min(self.num_layers, self.image_grid, self.codebook_size, self.max_text_len) < 1:
            raise ValueError("num_layers, image_grid, codebook_size and max_text_len must be >= 1")
        if not self.is_dense and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.mtp_heads < 0:
            raise ValueError("mtp_heads must be >= 0")

    @property
    def is_dense(self) -> bool:
        return self.dense_hidden > 0

    @property
    def text_vocab_size(self) -> int:
        return len(self.text_vocab)

    @property
    def image_tokens(self) -> int:
        return self.image_grid ** 2

    def dense_twin(self) -> "UnifiedConfig":
        """The dense baseline with the same active FFN width (top_k routed experts + the shared one)."""
        return self.replace(dense_hidden=self.top_k * self.expert_hidden + self.shared_hidden)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "UnifiedConfig":
        """Unit-test size (pair with VQConfig.tiny: 4x4 grid, 16 codes)."""
        base = dict(codebook_size=16, image_grid=4, max_text_len=24, dim=32, num_layers=2, num_heads=2,
                    num_experts=8, expert_hidden=16, top_k=2, shared_hidden=16, mtp_heads=2)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> "UnifiedConfig":
        """The size trained for docs/unified.md on one CPU core (32x32 images, 8x8 tokens, 256 codes)."""
        return cls(**kw)

    @classmethod
    def paper_flavoured(cls, **kw) -> "UnifiedConfig":
        """Illustrative large shape: ultra-sparse (64 experts, top-8 with a shared expert). Not trainable here."""
        base = dict(codebook_size=16384, image_grid=32, max_text_len=4096, dim=4096, num_layers=48, num_heads=32,
                    num_experts=64, expert_hidden=1536, top_k=8, shared_hidden=1536, mtp_heads=3)
        return cls(**{**base, **kw})


PRESETS = {"tiny": (UnifiedConfig.tiny, VQConfig.tiny), "cpu": (UnifiedConfig.cpu, VQConfig.cpu),
           "paper": (UnifiedConfig.paper_flavoured, VQConfig.cpu)}
