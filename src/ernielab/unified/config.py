"""Configs for the unified ERNIE 5.0-style model: VQ image tokenizer, the MoE transformer and its elastic
settings, and the evaluation defaults. No torch here: the CLI reads its defaults from this module.

Tiny (unit tests), CPU (the measured table in docs/unified.md) and paper-flavoured sizes sit side by
side. The paper-flavoured sizes only illustrate the shape of the real thing (many small experts,
top-8 routing, a shared expert, deep and wide); ERNIE 5.0's exact dimensions are not reproduced here.

`ElasticConfig` is a section of `UnifiedConfig`, so it is saved with the model: a model folder's
config.json says which sub-models it was trained to give (and `nested` decides how they are cut).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ernielab.core.config import Config, bounded


@dataclasses.dataclass
class VQConfig(Config):
    image_size: int = bounded(32, ge=1)
    patch_size: int = bounded(4, ge=1)  # one token per patch: grid = image_size / patch_size
    hidden: int = bounded(128, ge=1)  # conv channels at token resolution
    context_layers: int = bounded(1, ge=0)  # 3x3 convs at token resolution (encoder and decoder each)
    code_dim: int = bounded(16, ge=1)
    codebook_size: int = bounded(256, ge=2)
    commitment: float = bounded(0.25, ge=0)
    ema_decay: float = bounded(0.95, ge=0, lt=1)  # codebook vectors track their assigned encoder outputs
    # multi-scale residual quantisation (VAR): token-map sides, coarse to fine, the last = grid; () = one scale
    scales: tuple[int, ...] = ()

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.scales:
            check_scales(self.scales, self.grid, "scales")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def tiny(cls, **kw) -> VQConfig:
        return cls(**{**dict(image_size=16, patch_size=4, hidden=16, code_dim=4, codebook_size=16), **kw})

    @classmethod
    def cpu(cls, **kw) -> VQConfig:
        return cls(**kw)


@dataclasses.dataclass
class ElasticConfig(Config):
    """Elastic training: which sub-model (depth, experts per layer, top-k) each step trains.

    Each reduction keeps its ERNIE 5.0 probability (`p_*`); `coupled`, `nested` and `anchor` change what is
    drawn, never how often depth, experts and k shrink (see `submodel.sample_submodel`)."""

    enabled: bool = True  # False: every step trains the whole model
    p_full_depth: float = bounded(0.75, ge=0, le=1)
    p_all_experts: float = bounded(0.8, ge=0, le=1)
    p_default_k: float = bounded(0.8, ge=0, le=1)
    min_depth_fraction: float = bounded(0.5, gt=0, le=1)
    min_expert_fraction: float = bounded(0.5, gt=0, le=1)
    coupled: bool = False  # one uniform draw decides all three reductions
    # nested sub-models: a shallower model runs evenly spaced layers and a narrower one the first experts, in
    # training and in extraction (else: random subsets in training, cuts by training gate mass)
    nested: bool = False
    # in-place distillation: on steps that train a smaller sub-model, add this weight times
    # KL(full model || sub-model) to its loss (the full model's pass is extra forward work, no gradient)
    distill: float = bounded(0.0, ge=0)
    # share of the shrunken steps that train the anchor cut (the deployment sub-model) instead of a random one
    anchor: float = bounded(0.0, ge=0, le=1)
    anchor_cut: tuple[int, int, int] | None = None  # (depth, experts, top_k); None = half_active_cut


# settings of model folders and checkpoints written before `elastic` became a section
_OLD_ELASTIC_KEYS = {"elastic": "enabled", "elastic_nested": "nested", "elastic_coupled": "coupled",
                     "elastic_distill": "distill", "elastic_anchor": "anchor", "anchor_cut": "anchor_cut",
                     "p_full_depth": "p_full_depth", "p_all_experts": "p_all_experts", "p_default_k": "p_default_k",
                     "min_depth_fraction": "min_depth_fraction", "min_expert_fraction": "min_expert_fraction"}


def elastic_from_old(settings: dict[str, Any]) -> dict[str, Any]:
    """The `elastic` section from the flat settings of an older model or training config."""
    return {new: settings[old] for old, new in _OLD_ELASTIC_KEYS.items() if old in settings}


@dataclasses.dataclass
class UnifiedConfig(Config):
    # tokens
    text_vocab: tuple[int, ...] = ()  # WordPiece ids of the compact text vocabulary (see tokenizer.py)
    codebook_size: int = bounded(256, ge=1)  # image vocabulary = the VQ codebook
    image_grid: int = bounded(8, ge=1)  # image tokens form an image_grid x image_grid grid, one row per step
    # "rows": one decoding step per row of a single-scale VQ; "scales": one step per scale of a multi-scale VQ
    image_order: str = bounded("rows", choices=("rows", "scales"))
    image_scales: tuple[int, ...] = ()  # with "scales": the VQ's token-map sides, coarse to fine (last = image_grid)
    max_text_len: int = bounded(32, ge=1)  # caption tokens incl. BOS / EOS
    # trunk
    dim: int = bounded(128, ge=1)
    num_layers: int = bounded(4, ge=1)
    num_heads: int = bounded(4, ge=1)
    qk_norm: bool = True
    rope_theta: float = bounded(10_000.0, gt=0)
    # feed-forward: MoE when dense_hidden == 0, else a dense GeGLU of that width (the baseline)
    num_experts: int = bounded(16, ge=1)
    expert_hidden: int = bounded(64, ge=1)
    top_k: int = bounded(4, ge=1)
    shared_hidden: int = bounded(64, ge=0)  # 0 = no shared expert
    balance_rate: float = bounded(5e-3, ge=0)  # routing-bias step of the auxiliary-loss-free balancing
    dense_hidden: int = bounded(0, ge=0)
    # multi-token prediction: extra heads predicting text tokens t+2 .. t+1+mtp_heads
    mtp_heads: int = bounded(2, ge=0)
    elastic: ElasticConfig = dataclasses.field(default_factory=ElasticConfig)

    def check(self) -> None:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if not self.is_dense and self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.image_order == "scales":
            check_scales(self.image_scales, self.image_grid, "image_scales")
            if (self.dim // self.num_heads) % 8:  # rotary dims split over (group, h, w) as 1/2, 1/4, 1/4
                raise ValueError(f"image_order 'scales' needs a head size divisible by 8, got {self.dim // self.num_heads}")
        elif self.image_scales:
            raise ValueError("image_scales is set but image_order is 'rows': set image_order to 'scales'")
        if self.elastic.enabled and self.elastic.anchor > 0 and not self.is_dense:  # fail now, not mid-run
            check_cut(self, *(self.elastic.anchor_cut or half_active_cut(self)), what="elastic.anchor_cut")

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True, where: str = "") -> UnifiedConfig:
        """Also reads model configs written before `elastic` was a section (`elastic_nested: true`)."""
        if isinstance(data, dict) and "elastic_nested" in data:
            rest = {k: v for k, v in data.items() if k != "elastic_nested"}
            elastic = rest.get("elastic") if isinstance(rest.get("elastic"), dict) else {}
            data = {**rest, "elastic": {"nested": data["elastic_nested"], **elastic}}
        return super().from_dict(data, strict=strict, where=where)

    @property
    def is_dense(self) -> bool:
        return self.dense_hidden > 0

    @property
    def text_vocab_size(self) -> int:
        return len(self.text_vocab)

    @property
    def image_tokens(self) -> int:
        return sum(n * n for n in self.image_scales) if self.image_order == "scales" else self.image_grid ** 2

    def dense_twin(self) -> UnifiedConfig:
        """The dense baseline with the same active FFN width (top_k routed experts + the shared one); it is
        trained without elastic draws."""
        return self.replace(dense_hidden=self.top_k * self.expert_hidden + self.shared_hidden,
                            elastic=ElasticConfig(enabled=False))

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> UnifiedConfig:
        """Unit-test size (pair with VQConfig.tiny: 4x4 grid, 16 codes)."""
        base = dict(codebook_size=16, image_grid=4, max_text_len=24, dim=32, num_layers=2, num_heads=2,
                    num_experts=8, expert_hidden=16, top_k=2, shared_hidden=16, mtp_heads=2)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> UnifiedConfig:
        """The size trained for docs/unified.md on one CPU core (32x32 images, 8x8 tokens, 256 codes)."""
        return cls(**kw)

    @classmethod
    def paper_flavoured(cls, **kw) -> UnifiedConfig:
        """Illustrative large shape: ultra-sparse (64 experts, top-8 with a shared expert). Not trainable here."""
        base = dict(codebook_size=16384, image_grid=32, max_text_len=4096, dim=4096, num_layers=48, num_heads=32,
                    num_experts=64, expert_hidden=1536, top_k=8, shared_hidden=1536, mtp_heads=3)
        return cls(**{**base, **kw})


def check_scales(scales: tuple[int, ...], grid: int, name: str) -> None:
    """Token-map sides of a multi-scale image: increasing, ending at the full grid."""
    if not scales or scales[-1] != grid or any(a >= b for a, b in zip(scales, scales[1:])) or scales[0] < 1:
        raise ValueError(f"{name} must increase from >= 1 to the grid side {grid}, got {list(scales)}")


def half_active_cut(cfg: UnifiedConfig) -> tuple[int, int, int]:
    """(depth, experts, top_k) of the combined cut at about half the active parameters: 75% of the layers,
    half the experts, a quarter of k (4 layers / 16 experts / k=4 -> 3 / 8 / 1, 51% active)."""
    return round(0.75 * cfg.num_layers), cfg.num_experts // 2, max(1, cfg.top_k // 4)


def check_cut(cfg: UnifiedConfig, depth: int, num_experts: int, top_k: int, what: str = "cut") -> None:
    """A (depth, experts, top_k) cut must fit the model: ValueError naming it otherwise."""
    L, E = cfg.num_layers, cfg.num_experts
    if not (1 <= depth <= L and top_k <= num_experts <= E and 1 <= top_k <= cfg.top_k):
        raise ValueError(f"{what} (depth={depth}, experts={num_experts}, top_k={top_k}) does not fit a model with "
                         f"{L} layers, {E} experts and k={cfg.top_k}")


TASKS = ("t2i", "i2t", "text")  # caption -> image, image -> caption, text only (training and selection)


@dataclasses.dataclass
class EvalSettings(Config):
    """What `evaluation.evaluate` (and `ernielab unified eval`, `generate-image`) measure and sample with by
    default: the one place these defaults are written."""

    n_text: int = bounded(500, ge=1)  # held-out captions for text perplexity
    n_caption: int = bounded(200, ge=1)  # held-out images to caption
    per_kind: int = bounded(30, ge=0)  # generated images per prompt kind; 0 skips image alignment
    seed: int = 0
    guidance: float = bounded(3.0, ge=0)  # classifier-free guidance of image generation (1 = none)
    temperature: float = bounded(1.0, ge=0)  # 0 = greedy
    top_k: int = bounded(0, ge=0)  # sample among the k likeliest codes (0 = all)
    speed: bool = True  # measure decoding tokens/s


PRESETS = {"tiny": (UnifiedConfig.tiny, VQConfig.tiny), "cpu": (UnifiedConfig.cpu, VQConfig.cpu),
           "paper": (UnifiedConfig.paper_flavoured, VQConfig.cpu)}
