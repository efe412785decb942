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
from ernielab.core.ema import EMA
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.seeding import generator
from ernielab.image.buckets import BucketSampler, assign_buckets, make_buckets
from ernielab.image.caches import FeatureCache
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import (TIMESTEP_SAMPLING, TIMESTEP_SCALE, add_noise, flow_matching_loss,
                                          sample_training_sigmas)
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.lora import COMFYUI_WEIGHT_NAME, WEIGHT_NAME, LoraSettings, add_lora, save_lora, unload_lora
from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig, pad_text
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
    # Fine-tuning on a folder (docs/finetune.md); all off by default.
    cache_dir: str = ""  # folder data: latents + caption features encoded once to this folder, then read back
    buckets: bool = False  # folder data: aspect-ratio buckets of about image_size**2 pixels instead of squares
    bucket_max_ratio: float = bounded(2.0, ge=1)  # the most elongated bucket (long side / short side)
    validation_prompts: list[str] = dataclasses.field(default_factory=list)  # a contact sheet every N steps
    validation_every: int = bounded(0, ge=0)  # 0 = no validation sheets
    validation_steps: int = bounded(0, ge=0)  # sampling steps of a sheet; 0 = sampling.steps
    validation_seed: int = 0

    def check(self) -> None:
        if (self.cache_dir or self.buckets) and self.data.kind != "folder":
            raise ValueError(f"cache_dir and buckets need data.kind 'folder' (image files to key and measure), "
                             f"not {self.data.kind!r}")
        if self.validation_every and not self.validation_prompts:
            raise ValueError("validation_every > 0 needs validation_prompts")


# Fields that may change when a run resumes: where the cache lives and how validation is shown, not what is learned.
FINETUNE_RESUMABLE = frozenset({"cache_dir", "validation_prompts", "validation_every", "validation_steps",
                                "validation_seed"})


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
    resumable_changes = FINETUNE_RESUMABLE
    shardable = True  # fsdp: the blocks are sharded (core/sharding.py); subclasses are refused below

    def __init__(self, config: TrainConfig, accelerator=None):
        config.validate()
        self.config = cfg = config
        self.accelerator = accelerator
        if cfg.lora.enabled and type(self) is not Trainer:  # its hooks (model, export) are the plain Trainer's
            raise ValueError(f"lora: LoRA training is done by ERNIE-Image's own trainer, not {type(self).__name__}")
        finetune = [name for name, on in (("cache_dir", cfg.cache_dir), ("buckets", cfg.buckets),
                                          ("validation_every", cfg.validation_every)) if on]
        if finetune and type(self) is not Trainer:  # its batch and after-step hooks are the plain Trainer's
            raise ValueError(f"{finetune[0]}: used by ERNIE-Image's own trainer only, not {type(self).__name__}")
        if cfg.fsdp and (type(self) is not Trainer or cfg.lora.enabled or cfg.validation_every):
            what = "LoRA" if cfg.lora.enabled else "validation sheets" if cfg.validation_every else type(self).__name__
            raise ValueError(f"fsdp: sharded training is for full fine-tuning by ERNIE-Image's own trainer, not {what}")
        self.out = Path(cfg.output_dir)
        self.text_encoder = TextEncoder(cfg.text_encoder)
        self.latent_space = build_latent_space(cfg.latent)
        self.check_shapes()
        self.dataset = build_dataset(cfg.data)
        self.model: nn.Module | None = None
        self.sampler: BucketSampler | None = None  # aspect-ratio buckets, when on
        self.cache: FeatureCache | None = None  # latents and caption features on disk, when on
        self.ema: EMA | None = None
        if cfg.buckets:
            multiple = self.latent_space.downsample * cfg.model.patch_size
            buckets = make_buckets(cfg.data.image_size ** 2, multiple, cfg.bucket_max_ratio)
            self.sampler = BucketSampler(assign_buckets(self.dataset.sizes(), buckets), buckets)

    def train(self) -> dict:
        return Engine(self, self.accelerator).fit()

    # ---- hooks -------------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        self.accelerator = self.engine.accelerator
        self.rank = self.accelerator.process_index
        self.latent_space.to(self.accelerator.device)
        self.model = self.build_model()
        if self.config.cache_dir:
            self.build_cache()
        return {"model": self.model}

    def item_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) each dataset item is trained at: its bucket's, or the square image_size."""
        if self.sampler is not None:
            return [self.sampler.buckets[b] for b in self.sampler.assignment]
        return [(self.config.data.image_size,) * 2] * len(self.dataset)

    def build_cache(self) -> None:
        """The main process encodes what the cache lacks; every process then keys the items the same way."""
        self.cache = FeatureCache(self.config.cache_dir, self.latent_space, self.text_encoder)
        if self.accelerator.is_main_process:
            made = self.cache.build(self.dataset, self.item_sizes(), self.accelerator.device)
            print(f"cache {self.config.cache_dir}: {made['latents']} latents and {made['texts']} captions encoded, "
                  f"{made['reused']} entries reused")
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            self.cache.index(self.dataset, self.item_sizes())

    def make_ema(self, model: nn.Module) -> EMA:
        self.ema = super().make_ema(model)  # validation sheets show the EMA weights when they are kept
        return self.ema

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
        if self.sampler is None:
            size, indices = None, batch_indices(len(self.dataset), cfg.batch_size, cfg.seed, k, self.rank)
        else:
            size, indices = self.sampler.draw(cfg.batch_size, cfg.seed, k, self.rank)
        if self.cache is not None:
            items = {"x0": self.cache.latents(indices), "caption": [self.dataset.records[i].caption for i in indices]}
        elif size is not None:
            items = collate([self.dataset.item(i, *size) for i in indices])
        else:
            items = collate([self.dataset[i] for i in indices])
        return self.prepare_batch(items, self.generator(step, micro))

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        """Latents, noise, noise levels and text features for one micro-batch."""
        cfg, device = self.config, self.accelerator.device
        x0 = batch["x0"].to(device) if "x0" in batch else self.latent_space.encode(batch["image"].to(device))
        captions = list(batch["caption"])
        drop = torch.rand(len(captions), generator=g) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        if self.cache is not None:  # the features the encoder returned when the cache was built
            text, lens = pad_text(self.cache.text(captions), device=device)
        else:
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

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        done = step + 1
        cfg = self.config
        if cfg.validation_every and done % cfg.validation_every == 0 and self.accelerator.is_main_process:
            self.render_validation(self.accelerator.unwrap_model(model), done)
        return {}

    @torch.no_grad()
    def render_validation(self, model: nn.Module, step: int) -> Path:
        """`validation_prompts` drawn with the current weights (the EMA's when kept) at a fixed seed, as one
        contact sheet RUN/validation/step-XXXXXXX.png. Touches no training state and no global RNG."""
        import copy

        from ernielab.core.images import save_grid

        cfg = self.config
        if self.ema is not None:
            shown = copy.deepcopy(model)
            self.ema.copy_to(shown)
        else:
            shown = model
        training = shown.training
        try:
            with torch.random.fork_rng(devices=[]):  # sampling leaves the global RNG as it was
                pipe = TextToImagePipeline(shown.eval(), self.text_encoder, self.latent_space, pipeline_config(cfg))
                images = pipe(list(cfg.validation_prompts), num_inference_steps=cfg.validation_steps or None,
                              seed=cfg.validation_seed, output_type="pt").images
        finally:
            shown.train(training)
        return save_grid(list(images), self.out / "validation" / f"step-{step:07d}.png",
                         captions=list(cfg.validation_prompts))

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


@torch.no_grad()
def heldout_loss(pipeline: str | Path, data: DataConfig | None = None, n: int = 512, seed: int = 0,
                 batch_size: int = 64) -> dict[str, float]:
    """Flow-matching loss of a saved pipeline on a fixed held-out set: n items of `data` (default: the shapes
    world's val split at the pipeline's size), noise seeded by `seed`, and sigmas spread evenly over (0, 1)
    (item i at (i + 0.5) / n) whatever timestep sampling the model was trained with, so runs trained with
    different samplings are scored alike. -> {"loss", "loss_low", "loss_mid", "loss_high"} (sigma thirds)."""
    pipe = TextToImagePipeline.from_pretrained(pipeline)
    data = data or DataConfig(kind="shapes", split="val", image_size=pipe.config.height)
    dataset = build_dataset(data)
    g = generator("heldout", seed)
    indices = torch.randperm(len(dataset), generator=g)[:n].tolist() if len(dataset) < 10**6 else \
        torch.randint(len(dataset), (n,), generator=g).tolist()
    sigmas_all = (torch.arange(len(indices), dtype=torch.float32) + 0.5) / len(indices)
    losses = []
    for start in range(0, len(indices), batch_size):
        items = collate([dataset[i] for i in indices[start:start + batch_size]])
        x0 = pipe.latent_space.encode(items["image"])
        noise = torch.randn(x0.shape, generator=g)
        sigmas = sigmas_all[start:start + len(x0)]
        text, lens = pipe.text_encoder(list(items["caption"]))
        pred = pipe.transformer(add_noise(x0, noise, sigmas), sigmas * TIMESTEP_SCALE, text, lens)
        losses.append(flow_matching_loss(pred, x0, noise))
    per = torch.cat(losses)
    thirds = torch.tensor_split(per, 3)
    return {"loss": per.mean().item(), "loss_low": thirds[0].mean().item(), "loss_mid": thirds[1].mean().item(),
            "loss_high": thirds[2].mean().item()}
