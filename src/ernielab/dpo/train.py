"""Stabilized Diffusion-DPO for flow-matching text-to-image models (preference alignment).

Per pair (prompt, chosen image w, rejected image l), both images get the SAME noise and sigma:
x_sigma = (1 - sigma) x0 + sigma * noise, and the velocity error err(x0) = mean ||v(x_sigma) - (noise - x0)||^2
over the latent's elements, for the trained policy (err) and the frozen reference (ref = the initial model).

    delta_w = err(w) - ref(w),  delta_l = err(l) - ref(l)
    margin = -beta_eff * (delta_w - delta_l)                # = -beta_eff * (Diff_policy - Diff_ref)
    dpo = -log sigmoid(margin)                              # Diffusion-DPO (Wallace et al. 2023), velocity form

`DPOSettings.loss` picks what is added to the DPO term:

    "report" (default; the ERNIE-Image report's stabilized DPO, as written):
        loss = dpo + lambda_win * err(w) + lambda_lose * err(l)          # plain policy errors, not x beta
    "hinge" (this repo's earlier stabilized variant, kept with its numbers; docs/dpo-log.md 2026-11-24):
        loss = dpo + lambda_win * beta_eff * delta_w + lambda_lose * beta_eff * max(0, delta_l)
        (`anchors_in_reward_units=False`: lambda_win * err(w) + lambda_lose * max(0, delta_l))
    "plain": loss = dpo (Diffusion-DPO alone; the lambdas are ignored)

beta_eff = beta * beta_scale, with beta_scale = 1000 = T by default: Diffusion-DPO's beta*T, applied to
per-element mean errors; the default beta = 0.05 gives beta_eff = 50. For "report" beta_scale = 1 gives the
report's beta literally on per-element mean errors (its DPO term is then ~log 2 at every step).

The report's lambda_lose term pulls the rejected error DOWN (an SFT term on both images, against the DPO
push); the hinge instead only stops the rejected error from rising above the reference's, and scales both
anchors by beta_eff so that they are fixed fractions of the DPO gradient (docs/dpo.md).

`DPOTrainer` is the ERNIE-Image `Trainer` task, run by the core engine (accelerate, bf16, EMA, checkpoints
with exact resume, metrics); it adds the frozen reference, the pair batches and the DPO loss, and logs reward
accuracy and margins next to the loss. Train with `ernielab dpo train configs/dpo/shapes.json`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.config import Config, bounded
from ernielab.dpo.preferences import PreferencePairs
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import TIMESTEP_SCALE, add_noise, flow_matching_loss, sample_training_sigmas
from ernielab.image.pipeline import DEFAULT_MODEL, PIPELINE_CONFIG, PipelineConfig
from ernielab.image.train import TrainConfig, Trainer


LOSSES = ("report", "hinge", "plain")


@dataclasses.dataclass
class DPOSettings(Config):
    pairs: str = ""  # pairs.jsonl (see ernielab.dpo.preferences)
    loss: str = bounded("report", choices=LOSSES)  # see the module docstring
    beta: float = bounded(0.05, gt=0)
    beta_scale: float = bounded(1000.0, gt=0)  # beta_eff = beta * beta_scale; 1000 = T, as Diffusion-DPO's beta * T
    lambda_win: float = bounded(0.35, ge=0)  # weight of the chosen image's error term ("report", "hinge")
    lambda_lose: float = bounded(0.15, ge=0)  # "report": weight of err(l); "hinge": of max(0, delta_l)
    anchors_in_reward_units: bool = True  # "hinge" only: anchors x beta_eff; False: raw errors

    @property
    def beta_eff(self) -> float:
        return self.beta * self.beta_scale


@dataclasses.dataclass
class DPOTrainConfig(TrainConfig):
    dpo: DPOSettings = dataclasses.field(default_factory=DPOSettings)
    # fine-tuning defaults: short, small learning rate, no caption dropout (preferences are per prompt)
    output_dir: str = "runs/dpo"
    steps: int = bounded(300, ge=1)
    batch_size: int = bounded(8, ge=1)  # pairs per micro-step (the model sees 2x as many images)
    lr: float = bounded(1e-5, gt=0)
    warmup_steps: int = bounded(20, ge=0)
    ema_decay: float = bounded(0.0, ge=0, lt=1)
    cfg_dropout: float = bounded(0.0, ge=0, le=1)
    log_every: int = bounded(10, ge=1)
    save_every: int = bounded(100, ge=1)

    def check(self) -> None:
        if not self.init_from:
            raise ValueError("DPO needs init_from: the pipeline folder of the model to align (also the frozen "
                             "reference), or \"default\" for the bundled model")
        if not self.dpo.pairs:
            raise ValueError("DPO needs dpo.pairs: a pairs.jsonl file (make one with `ernielab dpo make-pairs`)")


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             settings: DPOSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss of `settings.loss` over pairs (per-pair errors [B]) and detached per-batch statistics."""
    delta_w, delta_l = err_w - ref_w, err_l - ref_l
    margin = -settings.beta_eff * (delta_w - delta_l)
    dpo = -F.logsigmoid(margin)
    anchor_lose = F.relu(delta_l)
    if settings.loss == "report":  # the report's formula: plain policy errors, not scaled by beta
        anchors = settings.lambda_win * err_w + settings.lambda_lose * err_l
    elif settings.loss == "plain":
        anchors = torch.zeros_like(dpo)
    elif settings.anchors_in_reward_units:  # "hinge": -r_w and max(0, -r_l), same units as the margin
        anchors = settings.beta_eff * (settings.lambda_win * delta_w + settings.lambda_lose * anchor_lose)
    else:  # "hinge" on raw errors: next to beta_eff ~ 50 these barely act (docs/dpo.md)
        anchors = settings.lambda_win * err_w + settings.lambda_lose * anchor_lose
    loss = dpo + anchors
    stats = {"dpo": dpo, "err_w": err_w, "err_l": err_l, "delta_w": delta_w, "delta_l": delta_l,
             "reward_margin": margin, "reward_acc": (margin > 0).float(), "anchor_lose": anchor_lose}
    return loss.mean(), {k: v.detach().float().mean() for k, v in stats.items()}


def resolve_config(cfg: TrainConfig) -> DPOTrainConfig:
    """Check what DPO needs, and take model, encoder, latents, size and sampling defaults from the
    init_from pipeline folder, so a config only names the model, the pairs and the DPO settings."""
    cfg = cfg if isinstance(cfg, DPOTrainConfig) else DPOTrainConfig.from_dict(cfg.to_dict())
    cfg.validate()
    init = DEFAULT_MODEL if cfg.init_from == "default" else Path(cfg.init_from)
    cfg = cfg.replace(init_from=str(init))
    if not init.exists():
        raise FileNotFoundError(f"init_from {init}: no such pipeline or transformer folder")
    if not (init / PIPELINE_CONFIG).is_file():
        return cfg  # a bare transformer folder: the config must describe it
    sampling = PipelineConfig.load(init / PIPELINE_CONFIG)
    raw = json.loads((init / "transformer" / "config.json").read_text())
    model = cfg.model if "_class_name" in raw else ErnieImageConfig.from_dict(raw)
    return cfg.replace(model=model, text_encoder=sampling.text_encoder, latent=sampling.latent, sampling=sampling,
                       data=cfg.data.replace(image_size=sampling.height))


class DPOTrainer(Trainer):
    """Trainer whose batches are preference pairs and whose loss is `dpo_loss` against a frozen reference."""

    def __init__(self, config: TrainConfig, accelerator=None):
        config = resolve_config(config)
        super().__init__(config, accelerator)
        self.dataset = PreferencePairs(config.dpo.pairs, config.data.image_size)
        self.reference: nn.Module | None = None

    def build_model(self) -> nn.Module:
        model = super().build_model()  # init_from weights
        # Built before the engine restores a checkpoint, so the reference is always the initial model.
        self.reference = copy.deepcopy(model).requires_grad_(False).eval().to(self.accelerator.device)
        return model

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        """Chosen images first, then rejected; the two halves share noise, sigma and text."""
        cfg, device = self.config, self.accelerator.device
        n = len(batch["caption"])
        x0 = self.latent_space.encode(torch.cat([batch["chosen"], batch["rejected"]]).to(device))
        drop = torch.rand(n, generator=g) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        text, lens = self.text_encoder(captions + captions, device=device)
        noise = torch.randn(x0[:n].shape, generator=g).to(device)
        sigmas = sample_training_sigmas(n, g, cfg.timestep_sampling, cfg.timestep_shift, device)
        # captions first: the engine counts a batch's samples by its first list (pairs, as before)
        return {"caption": list(batch["caption"]), "x0": x0, "noise": torch.cat([noise, noise]),
                "sigmas": torch.cat([sigmas, sigmas]), "text": text, "text_lens": lens, "pairs": n}

    def pair_errors(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image velocity errors of the policy (with grad) and of the reference (without)."""
        xt = add_noise(inputs["x0"], inputs["noise"], inputs["sigmas"])
        args = (xt, inputs["sigmas"] * TIMESTEP_SCALE, inputs["text"], inputs["text_lens"])
        err = flow_matching_loss(model(*args), inputs["x0"], inputs["noise"])
        with torch.no_grad(), self.accelerator.autocast():  # same compute dtype as the (prepared) policy
            ref = flow_matching_loss(self.reference(*args), inputs["x0"], inputs["noise"])
        return err, ref

    def dpo_terms(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        err, ref = self.pair_errors(model, inputs)
        n = inputs["pairs"]
        return dpo_loss(err[:n], err[n:], ref[:n], ref[n:], self.config.dpo)

    def compute_loss(self, model: nn.Module, inputs: dict, step: int) -> torch.Tensor:
        return self.dpo_terms(model, inputs)[0]

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss, and the DPO statistics the engine logs next to it (means over the log window and ranks)."""
        loss, stats = self.dpo_terms(model, batch)
        return loss, {k: v.item() for k, v in stats.items()}
