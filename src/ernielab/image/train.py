"""ERNIE-Image's training task: flow matching of a text-to-image transformer, run by the core engine.

One code path for 1 CPU process, N CPU processes (gloo) and N GPUs: launch with `accelerate launch` or
`torchrun`. Every random draw is seeded by (seed, step, micro, rank), so a resumed run continues exactly as an
uninterrupted one would. Variants (DPO, ViLG's experts and knowledge, distillation) subclass `Trainer` and
override its hooks: `build_model`, `prepare_batch`, `compute_loss`, `shipped_pipeline`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.core.config import bounded
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.seeding import generator
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import (TIMESTEP_SAMPLING, TIMESTEP_SCALE, add_noise, flow_matching_loss,
                                          sample_training_sigmas)
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.lora import COMFYUI_WEIGHT_NAME, WEIGHT_NAME, LoraSettings, add_lora, save_lora, unload_lora
from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.worlds.registry import DataConfig, build_dataset, collate


@dataclasses.dataclass
class TrainConfig(EngineSettings):
    model: ErnieImageConfig = dataclasses.field(default_factory=ErnieImageConfig.small)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    latent: LatentSpaceConfig = dataclasses.field(default_factory=LatentSpaceConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampling: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)  # defaults saved with the model
    ema_decay: float = bounded(0.999, ge=0, lt=1)
    cfg_dropout: float = bounded(0.1, ge=0, le=1)  # caption -> "" so the model learns the unconditional velocity
    timestep_sampling: str = bounded("logit_normal", choices=TIMESTEP_SAMPLING)
    timestep_shift: float = bounded(1.0, gt=0)
    init_from: str = ""  # fine-tune: start a fresh run from the weights of a pipeline or transformer folder
    gradient_checkpointing: bool = False
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)  # rank > 0: train a LoRA adapter only


def pipeline_config(cfg: TrainConfig) -> PipelineConfig:
    """What a trained model ships with: the sampling defaults plus the encoder, latents and size it was trained on."""
    return cfg.sampling.replace(text_encoder=cfg.text_encoder, latent=cfg.latent,
                                height=cfg.data.image_size, width=cfg.data.image_size)


def batch_indices(n: int, batch_size: int, seed: int, k: int, rank: int = 0) -> list[int]:
    """Batch k of process `rank`: a function of (seed, k, rank) alone, so resuming is exact."""
    return torch.randint(n, (batch_size,), generator=generator("batch", seed, k, rank)).tolist()


class Trainer(Task):
    """Flow matching on an image-caption dataset; `train()` runs it through the engine and ships a pipeline."""

    export_name = "pipeline"

    def __init__(self, config: TrainConfig, accelerator=None):
        config.validate()
        self.config = cfg = config
        self.accelerator = accelerator
        if cfg.lora.enabled and type(self) is not Trainer:  # its hooks (model, export) are the plain Trainer's
            raise ValueError(f"lora: LoRA training is done by ERNIE-Image's own trainer, not {type(self).__name__}")
        self.out = Path(cfg.output_dir)
        self.text_encoder = TextEncoder(cfg.text_encoder)
        self.latent_space = build_latent_space(cfg.latent)
        self.check_shapes()
        self.dataset = build_dataset(cfg.data)
        self.model: nn.Module | None = None

    def train(self) -> dict:
        return Engine(self, self.accelerator).fit()

    # ---- hooks -------------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        self.accelerator = self.engine.accelerator
        self.rank = self.accelerator.process_index
        self.latent_space.to(self.accelerator.device)
        self.model = self.build_model()
        return {"model": self.model}

    def build_model(self) -> nn.Module:
        model = ErnieImageTransformer(self.config.model)
        model.gradient_checkpointing = self.config.gradient_checkpointing
        if self.config.init_from:
            self.load_initial_weights(model, Path(self.config.init_from))
        if self.config.lora.enabled:  # base frozen; only the adapter trains (docs/lora.md)
            add_lora(model, self.config.lora)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.config.lora.enabled:
            return [{"params": [p for p in model.parameters() if p.requires_grad]}]
        return super().param_groups(model)

    @staticmethod
    def load_initial_weights(model: nn.Module, path: Path) -> None:
        """Weights of a saved pipeline (its transformer/) or transformer folder; the configs must agree."""
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        pretrained = ErnieImageTransformer.from_pretrained(folder)
        if pretrained.config != model.config:
            raise ValueError(f"init_from {path}: its transformer config differs from the training config's model")
        model.load_state_dict(pretrained.state_dict())

    def check_shapes(self) -> None:
        cfg = self.config
        c, _, _ = self.latent_space.latent_shape(cfg.data.image_size, cfg.data.image_size)
        if cfg.model.in_channels != c or cfg.model.out_channels != c:
            raise ValueError(f"model in/out channels ({cfg.model.in_channels}/{cfg.model.out_channels}) must equal "
                             f"the latent channels ({c}) of latent space {cfg.latent.kind!r}")
        if cfg.model.text_in_dim != self.text_encoder.dim:
            raise ValueError(f"model.text_in_dim {cfg.model.text_in_dim} != text encoder dim {self.text_encoder.dim}")

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        return generator("noise", self.config.seed, step, micro, self.rank)

    def batch(self, step: int, micro: int) -> dict:
        cfg = self.config
        k = step * cfg.grad_accum + micro
        items = collate([self.dataset[i] for i in batch_indices(len(self.dataset), cfg.batch_size, cfg.seed, k,
                                                                 self.rank)])
        return self.prepare_batch(items, self.generator(step, micro))

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        """Latents, noise, noise levels and text features for one micro-batch."""
        cfg, device = self.config, self.accelerator.device
        x0 = self.latent_space.encode(batch["image"].to(device))
        captions = list(batch["caption"])
        drop = torch.rand(len(captions), generator=g) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        text, lens = self.text_encoder(captions, device=device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        sigmas = sample_training_sigmas(len(x0), g, cfg.timestep_sampling, cfg.timestep_shift, device)
        return {**batch, "x0": x0, "noise": noise, "sigmas": sigmas, "text": text, "text_lens": lens,
                "captions_used": captions, "dropped": drop}

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.compute_loss(model, batch, step), {}

    def compute_loss(self, model: nn.Module, inputs: dict, step: int) -> torch.Tensor:
        xt = add_noise(inputs["x0"], inputs["noise"], inputs["sigmas"])
        pred = model(xt, inputs["sigmas"] * TIMESTEP_SCALE, inputs["text"], inputs["text_lens"])
        return flow_matching_loss(pred, inputs["x0"], inputs["noise"]).mean()

    # ---- what the run ships ------------------------------------------------------------------
    def shipped_pipeline(self, model: nn.Module) -> TextToImagePipeline:
        """The pipeline a finished run exports (a hook: distillation adds its finisher)."""
        return TextToImagePipeline(model.float().eval(), self.text_encoder, self.latent_space,
                                   pipeline_config(self.config))

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        if self.config.lora.enabled:  # the adapter, not the model: diffusers' format (and ComfyUI's on request)
            out = run_dir / "lora"
            save_lora(model, out / WEIGHT_NAME)
            if self.config.lora.comfyui:
                save_lora(model, out / COMFYUI_WEIGHT_NAME, format="comfyui")
            return out
        out = run_dir / self.export_name
        self.shipped_pipeline(model).save_pretrained(out)
        return out


def export_checkpoint(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                      use_ema: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Turn a training checkpoint (default: the latest) of a run into a pipeline folder, without training."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "train_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (train_config.json missing)")
    cfg = TrainConfig.load(cfg_file, strict=False)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoints in {run_dir}")
    modules = load_checkpoint(path)["modules"]
    model = ErnieImageTransformer(cfg.model)
    if cfg.lora.enabled:  # a LoRA run's checkpoint: the adapter is fused into the base weights
        add_lora(model, cfg.lora)
    state = modules["ema"] if use_ema and "ema" in modules else modules["model"]
    model.load_state_dict_checked({k: v.to(torch.float32) for k, v in state.items()})
    if cfg.lora.enabled:
        unload_lora(model, fuse=True)
    out = Path(out)
    model.save_pretrained(out / "transformer", dtype=dtype)
    pipeline_config(cfg).save(out / "pipeline.json")
    return out
