"""ERNIE-ViLG 2.0 training: mixture of denoising experts (MoDE) and knowledge-enhanced losses.

- `MoDETrainerMixin`: stage 2 of MoDE. Builds N copies of a stage-1 model (weights, EMA and Adam
  moments copied) and, with routing "per_step" (the paper), draws one noise level per step, trains
  only the expert owning it, and draws the whole batch's noise levels inside that expert's interval
  (the marginal noise distribution is unchanged). "per_sample" routes each sample to its own expert.
- `KnowledgeTrainerMixin`: textual knowledge (image->key-word attention weights x (1 + w_a) on a
  fraction of samples, optional POS markers), visual knowledge (loss x (1 + w_l) inside object
  regions on a fraction of samples), caption enrichment. Training only: the exported model is plain.
- `VilgTrainer` = both on top of `Trainer`, driven by `VilgTrainConfig` (mode.experts=1 and
  knowledge.enabled=False give the plain trainer back).
- `Stage2Config` / `stage2_config`: the stage-1 -> stage-2 step (one config per link of the chain).

The engine runs the loop (ernielab.core.engine): stage 2's copies of stage 1's EMA and Adam moments enter
through the task's `make_ema` and `init_optimizer` hooks. CLI (src/ernielab/vilg/cli.py):
`ernielab vilg train configs/vilg/stage1.json` and `ernielab vilg stage2 configs/vilg/stage2.json`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ernielab.core.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from ernielab.core.cli import deep_merge
from ernielab.core.config import Config, bounded
from ernielab.core.ema import EMA
from ernielab.core.seeding import generator
from ernielab.image.flow_matching import (
    TIMESTEP_SCALE,
    add_noise,
    flow_matching_loss,
    sample_training_sigmas,
    shift_sigmas,
)
from ernielab.image.train import TrainConfig, Trainer
from ernielab.vilg.experts import MixtureOfDenoisingExperts, check_boundaries, expert_index, uniform_boundaries
from ernielab.vilg.knowledge import (
    boxes_from_batch,
    enrich_caption,
    get_tagger,
    insert_pos_markers,
    key_token_mask,
    key_words,
    keyword_attention_bias,
    region_weights,
    scene_objects,
)

# Sigmas drawn for an expert stay this far inside its interval, so float rounding of
# timestep = 1000 * sigma can never route a sample to the neighbouring expert.
EDGE_MARGIN = 1e-4


ROUTINGS = ("per_step", "per_sample")
TAGGERS = ("auto", "spacy", "lexicon")


@dataclasses.dataclass
class MoDESettings(Config):
    experts: int = bounded(1, ge=1)  # 1 (with no boundaries): a plain single denoiser
    boundaries: tuple[float, ...] = ()  # empty: N equal intervals
    routing: str = bounded("per_step", choices=ROUTINGS)  # "per_step" (paper: one expert per step) | "per_sample"
    init_from: str = ""  # stage-1 checkpoint folder, training output dir or pipeline folder ("" = random init)
    copy_optimizer: bool = True  # start every expert's Adam moments from stage 1's (checkpoint folders only)

    def __post_init__(self):
        self.boundaries = tuple(self.boundaries)

    def check(self) -> None:
        if self.boundaries:
            if len(self.boundaries) != self.experts + 1:
                raise ValueError(f"{self.experts} experts need {self.experts + 1} boundaries, "
                                 f"got {len(self.boundaries)}")
            check_boundaries(self.boundaries)

    @property
    def enabled(self) -> bool:
        return self.experts > 1 or bool(self.boundaries)

    def resolved_boundaries(self) -> tuple[float, ...]:
        return self.boundaries or uniform_boundaries(self.experts)


@dataclasses.dataclass
class KnowledgeConfig(Config):
    enabled: bool = False
    attn_boost: float = bounded(0.01, gt=-1)  # w_a: key-word attention weight x (1 + w_a)
    attn_prob: float = bounded(0.5, ge=0, le=1)  # fraction of samples that get the attention boost
    region_boost: float = bounded(0.1, gt=-1)  # w_l: loss x (1 + w_l) inside object regions
    region_prob: float = bounded(0.5, ge=0, le=1)
    pos_markers: bool = False  # "[adj] red [noun] circle" on a fraction of samples
    pos_marker_prob: float = bounded(0.5, ge=0, le=1)
    enrich_captions: bool = True  # append objects present in the scene but missing from the caption
    tagger: str = bounded("auto", choices=TAGGERS)  # "auto" (spaCy if installed, else lexicon) | "spacy" | "lexicon"


@dataclasses.dataclass
class VilgTrainConfig(TrainConfig):
    mode: MoDESettings = dataclasses.field(default_factory=MoDESettings)
    knowledge: KnowledgeConfig = dataclasses.field(default_factory=KnowledgeConfig)


class ContinuedEMA(EMA):
    """An EMA whose warm-up counts steps on from an earlier run's `offset`."""

    def __init__(self, ema: EMA, offset: int):
        self.decay, self.shadow, self.offset = ema.decay, ema.shadow, offset

    def update(self, model: nn.Module, step: int | None = None) -> None:
        super().update(model, None if step is None else step + self.offset)


# ---- stage-1 weights ---------------------------------------------------------------------------
def load_stage1(path: str | Path) -> dict:
    """{"model", "ema", "optim", "step", "config"} from a checkpoint folder, a training output dir (its latest
    checkpoint), a pipeline folder or a transformer folder (the last two hold shipped weights only: no
    optimizer state, step 0). Checkpoints are read as safetensors + JSON (ernielab.core.checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mode.init_from {path}: no such stage-1 run, checkpoint or pipeline folder")
    if (path / CKPT_DIR).is_dir() or (path / "train_config.json").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"mode.init_from {path}: the run has no finished training checkpoint")
        path = ckpt
    if (path / "state.json").is_file():
        ckpt = load_checkpoint(path)
        modules, states = ckpt["modules"], ckpt["states"]
        if "model" not in modules:
            raise ValueError(f"mode.init_from {path}: the checkpoint holds no model weights")
        return {"model": modules["model"], "ema": modules.get("ema"), "optim": states.get("optimizer"),
                "step": ckpt["step"], "config": ckpt["config"], "path": path}
    if (path / "pipeline.json").is_file():
        path = path / "transformer"
    if (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
        return {"model": state, "ema": state, "optim": None, "step": 0, "config": None, "path": path}
    raise FileNotFoundError(f"mode.init_from {path} is not a stage-1 checkpoint, training output, pipeline or "
                            f"transformer folder")


def replicate_state(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Single-model state dict -> the state dict of a MoDE of n copies."""
    return {f"experts.{i}.{k}": v.clone() for i in range(n) for k, v in state.items()}


def replicate_optimizer_state(single: dict, n: int, target: torch.optim.Optimizer) -> dict:
    """Adam state of one model -> n experts (MoDE parameters are expert 0's, then expert 1's, ...).
    Hyperparameters (lr, schedule) stay those of `target`."""
    out = target.state_dict()
    k = sum(len(g["params"]) for g in single["param_groups"])
    if k * n != sum(len(g["params"]) for g in out["param_groups"]):
        raise ValueError(f"stage-1 optimizer has {k} parameters; the MoDE does not have {n} x {k}")
    out["state"] = {e * k + i: copy.deepcopy(s) for e in range(n) for i, s in single["state"].items()}
    return out


def sample_sigmas_between(batch: int, g: torch.Generator, lo: float, hi: float, mode: str = "logit_normal",
                          shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Training noise levels (as `sample_training_sigmas`) conditioned on lo <= sigma < hi, by inverse CDF."""
    def unshift(s: float) -> float:  # inverse of shift_sigmas
        return s / (shift - (shift - 1) * s)

    a, b = unshift(lo), unshift(hi)
    u = torch.rand(batch, generator=g, dtype=torch.float64)
    if mode == "uniform":
        s = a + (b - a) * u
    elif mode == "logit_normal":
        def cdf(v: float) -> float:
            if v <= 0:
                return 0.0
            if v >= 1:
                return 1.0
            z = (torch.logit(torch.tensor(v, dtype=torch.float64)) - logit_mean) / logit_std
            return float(torch.special.ndtr(z))

        p = cdf(a) + (cdf(b) - cdf(a)) * u
        s = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(p))
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r} (use 'uniform' or 'logit_normal')")
    s = shift_sigmas(s, shift)
    return s.clamp(lo + EDGE_MARGIN, hi - EDGE_MARGIN).float()


# ---- MoDE stage 2 ------------------------------------------------------------------------------
class MoDETrainerMixin:
    config: VilgTrainConfig

    def build_model(self) -> nn.Module:
        single = super().build_model()
        mode = self.config.mode
        self._stage1 = load_stage1(mode.init_from) if mode.init_from else None
        if self._stage1 is not None:
            self.check_stage1(self._stage1)
            try:
                single.load_state_dict_checked(self._stage1.pop("model"))
            except ValueError as e:
                raise ValueError(f"mode.init_from {self._stage1['path']}: {e}") from None
        if not mode.enabled:
            return single
        return MixtureOfDenoisingExperts.from_single(single, mode.experts, mode.resolved_boundaries())

    def check_stage1(self, stage1: dict) -> None:
        """A stage-1 checkpoint must hold the model this config trains (not only one of the same shapes)."""
        saved = (stage1["config"] or {}).get("model")
        if saved is not None and type(self.config.model).from_dict(saved, strict=False) != self.config.model:
            raise ValueError(f"mode.init_from {stage1['path']}: stage 1 trained another model config than this "
                             f"config's model")

    @property
    def find_unused_parameters(self) -> bool:
        return self.config.mode.enabled  # per-step routing leaves the other experts without gradients

    def make_ema(self, model: nn.Module) -> EMA:
        """Stage 2's EMA starts from stage 1's, copied into every expert; its warm-up counts on from stage 1's
        step, or the restarted step counter would make the copied EMA jump to the raw weights at first."""
        ema = super().make_ema(model)
        stage1 = self._stage1
        if stage1 is None or stage1["ema"] is None:
            return ema
        mode = self.config.mode
        ema.load_state_dict(replicate_state(stage1["ema"], mode.experts) if mode.enabled else stage1["ema"])
        return ContinuedEMA(ema, stage1["step"])

    def init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A fresh stage 2 starts every expert's Adam moments from stage 1's (a resumed run has its own)."""
        stage1, mode = self._stage1, self.config.mode
        if stage1 is None or stage1["optim"] is None or not mode.copy_optimizer:
            return
        n = mode.experts if mode.enabled else 1
        try:
            optimizer.load_state_dict(replicate_optimizer_state(stage1["optim"], n, optimizer))
        except ValueError as e:
            raise ValueError(f"mode.init_from {stage1['path']}: {e}") from None

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        inputs = super().prepare_batch(batch, g)
        mode, cfg = self.config.mode, self.config
        if not mode.enabled or mode.routing != "per_step":
            return inputs
        # One draw from the training distribution picks the expert (so each is picked with its interval's
        # probability mass); the batch then draws inside that interval.
        gm = generator("mode-routing", g.initial_seed())
        b = mode.resolved_boundaries()
        first = sample_training_sigmas(1, gm, cfg.timestep_sampling, cfg.timestep_shift)
        k = int(expert_index(first, b)[0])
        sigmas = sample_sigmas_between(len(inputs["sigmas"]), gm, b[k], b[k + 1], cfg.timestep_sampling,
                                       cfg.timestep_shift)
        return {**inputs, "sigmas": sigmas.to(inputs["sigmas"].device), "expert": k}


# ---- knowledge ---------------------------------------------------------------------------------
class KnowledgeTrainerMixin:
    config: VilgTrainConfig
    region_source = staticmethod(boxes_from_batch)  # batch -> list of [n, 4] pixel boxes (or None) per item

    @functools.cached_property
    def tagger(self):
        return get_tagger(self.config.knowledge.tagger)  # once per trainer ("auto" tries spaCy, else warns once)

    def knowledge_captions(self, batch: dict, g: torch.Generator):
        """Enriched (and maybe POS-marked) captions with their key words."""
        k = self.config.knowledge
        captions = list(batch["caption"])
        if k.enrich_captions and "scene" in batch:
            captions = [enrich_caption(c, scene_objects(s)) for c, s in zip(captions, batch["scene"])]
        words = [key_words(c, self.tagger) for c in captions]
        if k.pos_markers:
            marked = torch.rand(len(captions), generator=g) < k.pos_marker_prob
            for i in marked.nonzero().flatten().tolist():
                captions[i], words[i] = insert_pos_markers(captions[i], words[i])
        return captions, words

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        k = self.config.knowledge
        if not k.enabled:
            return super().prepare_batch(batch, g)
        gk = generator("knowledge", g.initial_seed())  # own stream: the base draws stay as without knowledge
        captions, words = self.knowledge_captions(batch, gk)
        attn_on = torch.rand(len(captions), generator=gk) < k.attn_prob
        region_on = torch.rand(len(captions), generator=gk) < k.region_prob
        inputs = super().prepare_batch({**batch, "caption": captions}, g)
        x0, text = inputs["x0"], inputs["text"]
        if k.attn_boost != 0 and attn_on.any():
            key = torch.zeros(text.shape[:2], dtype=torch.bool)
            max_len = self.text_encoder.config.max_length
            for i, (caption, dropped) in enumerate(zip(inputs["captions_used"], inputs["dropped"].tolist())):
                if not dropped and attn_on[i]:
                    mask = key_token_mask(self.text_encoder.tokenizer, caption, words[i], max_len)
                    key[i, : len(mask)] = mask
            p = self.config.model.patch_size
            n_img = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            inputs["attn_bias"] = keyword_attention_bias(key, n_img, k.attn_boost).to(x0.device, text.dtype)
            inputs["key_tokens"] = key
        if k.region_boost != 0 and region_on.any():
            weights = region_weights(self.region_source(batch), tuple(batch["image"].shape[-2:]),
                                     tuple(x0.shape[-2:]), k.region_boost, region_on)
            inputs["loss_weight"] = weights.to(x0.device)
        return inputs

    def compute_loss(self, model: nn.Module, inputs: dict, step: int) -> torch.Tensor:
        if "attn_bias" not in inputs and "loss_weight" not in inputs:
            return super().compute_loss(model, inputs, step)
        xt = add_noise(inputs["x0"], inputs["noise"], inputs["sigmas"])
        pred = model(xt, inputs["sigmas"] * TIMESTEP_SCALE, inputs["text"], inputs["text_lens"],
                     attn_bias=inputs.get("attn_bias"))
        return flow_matching_loss(pred, inputs["x0"], inputs["noise"], inputs.get("loss_weight")).mean()


class VilgTrainer(KnowledgeTrainerMixin, MoDETrainerMixin, Trainer):
    """Trainer with MoDE (config.mode) and knowledge enhancement (config.knowledge)."""

    def __init__(self, config: TrainConfig, accelerator=None, region_source=None):
        if not isinstance(config, VilgTrainConfig):
            config = VilgTrainConfig.from_dict(config.to_dict())
        if region_source is not None:
            self.region_source = region_source
        self._stage1: dict | None = None
        super().__init__(config, accelerator)


# ---- stage 1 -> stage 2 ------------------------------------------------------------------------
def stage2_config(stage1: TrainConfig, experts: int, steps: int, output_dir: str, init_from: str = "",
                  boundaries: tuple[float, ...] = (), routing: str = "per_step", **changes) -> VilgTrainConfig:
    """Config for MoDE stage 2 from a stage-1 config: same model/data/optimiser settings, `experts`
    copies initialised from `init_from` (default: stage 1's output dir, i.e. its latest checkpoint).
    The seed moves on by one (unless `changes` names one), so stage 2 draws batches and noise that stage 1 did
    not. `changes` are other fields of the stage-2 config; nested sections merge ({"knowledge": {...}})."""
    if "mode" in changes:
        raise ValueError("stage 2 sets mode itself (experts, boundaries, routing, init_from); do not override it")
    mode = MoDESettings(experts=experts, boundaries=tuple(boundaries), routing=routing,
                        init_from=init_from or stage1.output_dir)
    mode.validate("mode")
    data = {**stage1.to_dict(), "resume": "auto", "seed": stage1.seed + 1}
    data = deep_merge(data, {k: v.to_dict() if isinstance(v, Config) else v for k, v in changes.items()})
    data.update(mode=mode.to_dict(), steps=steps, output_dir=output_dir)
    return VilgTrainConfig.from_dict(data)


@dataclasses.dataclass
class Stage2Config(Config):
    """`ernielab vilg stage2 CONFIG`: MoDE stage 2 of a finished stage-1 run. The stage-2 training config is
    the stage-1 run's own (its train_config.json) with these experts, steps and output_dir, seed + 1, and the
    `overrides` (other training fields, e.g. {"save_every": 100, "warmup_steps": 0})."""

    stage1: str = ""  # the stage-1 run folder (its output_dir)
    checkpoint: str = ""  # start from this checkpoint (or pipeline) folder instead of the run's latest checkpoint
    experts: int = bounded(4, ge=1)
    boundaries: tuple[float, ...] = ()  # empty: equal intervals
    routing: str = bounded("per_step", choices=ROUTINGS)
    steps: int = bounded(500, ge=1)
    output_dir: str = "runs/vilg_mode"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        if not self.stage1:
            raise ValueError("stage1: name the stage-1 run folder (the output_dir of `ernielab vilg train`)")
        if "mode" in self.overrides:
            raise ValueError("overrides.mode: stage 2 sets mode itself (experts, boundaries, routing)")
        MoDESettings(experts=self.experts, boundaries=tuple(self.boundaries), routing=self.routing).validate()

    def train_config(self) -> VilgTrainConfig:
        run = Path(self.stage1)
        saved = run / "train_config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"stage1 {run} is not a training run folder (train_config.json missing)")
        stage1 = VilgTrainConfig.load(saved, strict=False)
        return stage2_config(stage1, self.experts, self.steps, self.output_dir, init_from=self.checkpoint or str(run),
                             boundaries=self.boundaries, routing=self.routing, **self.overrides)
