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
- `stage2_config`: the stage-1 -> stage-2 step.

CLI: `python -m ernielab.vilg.train train CONFIG [KEY=VALUE ...]` and
`python -m ernielab.vilg.train stage2 STAGE1_OUTPUT_DIR --experts 4 --steps 500 --out DIR`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.core.config import Config
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
from ernielab.vilg.experts import MixtureOfDenoisingExperts, expert_index, uniform_boundaries
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


@dataclasses.dataclass
class MoDESettings(Config):
    experts: int = 1  # 1 (with no boundaries): a plain single denoiser
    boundaries: tuple[float, ...] = ()  # empty: N equal intervals
    routing: str = "per_step"  # "per_step" (paper: one expert per step) | "per_sample"
    init_from: str = ""  # stage-1 checkpoint folder, training output dir or pipeline folder ("" = random init)
    copy_optimizer: bool = True  # start every expert's Adam moments from stage 1's (checkpoint folders only)

    def __post_init__(self):
        self.boundaries = tuple(self.boundaries)
        if self.routing not in ("per_step", "per_sample"):
            raise ValueError(f"mode.routing must be 'per_step' or 'per_sample', got {self.routing!r}")
        if self.boundaries and len(self.boundaries) != self.experts + 1:
            raise ValueError(f"{self.experts} experts need {self.experts + 1} boundaries, got {len(self.boundaries)}")

    @property
    def enabled(self) -> bool:
        return self.experts > 1 or bool(self.boundaries)

    def resolved_boundaries(self) -> tuple[float, ...]:
        return self.boundaries or uniform_boundaries(self.experts)


@dataclasses.dataclass
class KnowledgeConfig(Config):
    enabled: bool = False
    attn_boost: float = 0.01  # w_a: key-word attention weight x (1 + w_a)
    attn_prob: float = 0.5  # fraction of samples that get the attention boost
    region_boost: float = 0.1  # w_l: loss x (1 + w_l) inside object regions
    region_prob: float = 0.5
    pos_markers: bool = False  # "[adj] red [noun] circle" on a fraction of samples
    pos_marker_prob: float = 0.5
    enrich_captions: bool = True  # append objects present in the scene but missing from the caption
    tagger: str = "auto"  # "auto" (spaCy if installed, else lexicon) | "spacy" | "lexicon"


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
    """{"model", "ema", "optim"} from a checkpoint folder, a training output dir (its latest
    checkpoint), a pipeline folder or a transformer folder (the last two hold shipped weights only)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path} has no finished training checkpoint")
        path = ckpt
    if (path / "state.json").is_file():
        step = json.loads((path / "state.json").read_text())["step"]
        out = {"model": load_file(str(path / "model.safetensors")), "ema": None, "optim": None, "step": step}
        if (path / "ema.safetensors").is_file():
            out["ema"] = load_file(str(path / "ema.safetensors"))
        if (path / "optimizer.pt").is_file():
            out["optim"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)["optimizer"]
        return out
    if (path / "pipeline.json").is_file():
        path = path / "transformer"
    if (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
        return {"model": state, "ema": state, "optim": None, "step": 0}
    raise FileNotFoundError(f"{path} is not a stage-1 checkpoint, training output, pipeline or transformer folder")


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
            single.load_state_dict_checked(self._stage1["model"])
        if not mode.enabled:
            return single
        return MixtureOfDenoisingExperts.from_single(single, mode.experts, mode.resolved_boundaries())

    def init_ema_from_stage1(self) -> None:
        if self._stage1 is None or self.ema is None or self._stage1["ema"] is None:
            return
        ema = self._stage1["ema"]
        self.ema.load_state_dict(replicate_state(ema, self.config.mode.experts) if self.config.mode.enabled else ema)
        # The EMA's warm-up depends on the step; count on from stage 1, or the restarted step counter
        # would make the copied EMA jump to the raw weights in stage 2's first steps.
        self.ema = ContinuedEMA(self.ema, self._stage1["step"])

    def maybe_resume(self, opt, sched) -> int:
        mode = self.config.mode
        ckpt = latest_checkpoint(self.out) if self.config.resume == "auto" else None
        if ckpt is not None:
            saved = json.loads((ckpt / "state.json").read_text())["config"].get("mode", {})
            if MoDESettings.from_dict(saved, strict=False).resolved_boundaries() != mode.resolved_boundaries():
                raise ValueError(f"checkpoint {ckpt} was trained with other experts/boundaries; "
                                 f"use a new output_dir or resume=''")
        step = super().maybe_resume(opt, sched)
        if step == 0 and self._stage1 is not None and self._stage1["optim"] is not None and mode.copy_optimizer:
            n = mode.experts if mode.enabled else 1
            opt.load_state_dict(replicate_optimizer_state(self._stage1["optim"], n, opt))
        return step

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

    @property
    def tagger(self):
        return get_tagger(self.config.knowledge.tagger)

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

    def __init__(self, config: VilgTrainConfig, accelerator=None, region_source=None):
        if not isinstance(config, VilgTrainConfig):
            config = VilgTrainConfig.from_dict(config.to_dict())
        if accelerator is None and config.mode.enabled:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            # per-step routing leaves the other experts without gradients: DDP must allow that
            accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                      gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available(),
                                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        if region_source is not None:
            self.region_source = region_source
        super().__init__(config, accelerator)
        self.init_ema_from_stage1()


# ---- stage 1 -> stage 2 ------------------------------------------------------------------------
def stage2_config(stage1: TrainConfig, experts: int, steps: int, output_dir: str, init_from: str = "",
                  boundaries: tuple[float, ...] = (), routing: str = "per_step", **changes) -> VilgTrainConfig:
    """Config for MoDE stage 2 from a stage-1 config: same model/data/optimiser settings, `experts`
    copies initialised from `init_from` (default: stage 1's output dir, i.e. its latest checkpoint).
    The seed moves on by one, so stage 2 draws batches and noise that stage 1 did not."""
    base = VilgTrainConfig.from_dict(stage1.to_dict())
    mode = MoDESettings(experts=experts, boundaries=tuple(boundaries), routing=routing,
                        init_from=init_from or stage1.output_dir)
    return base.replace(mode=mode, steps=steps, output_dir=output_dir, seed=stage1.seed + 1, **changes)


# ---- CLI ---------------------------------------------------------------------------------------
def _cli():
    import typer

    from ernielab.core.cli import load_config, set_threads, user_errors

    app = typer.Typer(add_completion=False, no_args_is_help=True, help="ERNIE-ViLG 2.0 training (MoDE, knowledge).")

    @app.command()
    @user_errors
    def train(config: Path, set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set steps=10"),
              threads: int = typer.Option(0, help="torch threads (0: torch's default)")):
        """Train with a VilgTrainConfig JSON (any TrainConfig JSON plus `mode` / `knowledge`)."""
        set_threads(threads)
        print(json.dumps(VilgTrainer(load_config(VilgTrainConfig, config, set_)).train()))

    @app.command()
    def stage2(stage1_dir: Path, experts: int = 4, steps: int = 500, out: str = "runs/mode_stage2",
               routing: str = "per_step"):
        """Copy a finished stage-1 run (its train_config.json and latest checkpoint) into N experts and train."""
        stage1 = VilgTrainConfig.load(stage1_dir / "train_config.json")
        cfg = stage2_config(stage1, experts, steps, out, init_from=str(stage1_dir), routing=routing)
        print(json.dumps(VilgTrainer(cfg).train()))

    return app


if __name__ == "__main__":
    _cli()()
