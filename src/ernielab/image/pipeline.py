"""Text-to-image pipeline: text encoder -> ERNIE-Image transformer + Euler/CFG sampler -> latent decoder.

On disk (`save_pretrained`): pipeline.json (text encoder, latent space, sampling defaults) and
transformer/ (config.json + model.safetensors); a few-step student may also carry finisher/, a second
transformer (e.g. its teacher) that takes the last `finisher_steps` steps without CFG.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from ernielab.core.config import Config
from ernielab.core.images import to_pil
from ernielab.image.config import check_interchangeable
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.registry import load_transformer
from ernielab.image.samplers import cfg_denoiser, euler_sample, sigma_schedule
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig
from ernielab.image.transformer import ErnieImageTransformer

PIPELINE_CONFIG = "pipeline.json"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "default"


@dataclasses.dataclass
class PipelineConfig(Config):
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    latent: LatentSpaceConfig = dataclasses.field(default_factory=LatentSpaceConfig)
    height: int = 32
    width: int = 32
    steps: int = 50
    guidance_scale: float = 4.0
    shift: float = 4.0
    negative_prompt: str = ""
    finisher_steps: int = 0  # last steps run by finisher/ (no CFG); 0 = none


class TextToImagePipeline:
    def __init__(self, transformer: ErnieImageTransformer, text_encoder: TextEncoder, latent_space,
                 config: PipelineConfig | None = None, finisher: torch.nn.Module | None = None):
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.latent_space = latent_space
        self.config = config or PipelineConfig(text_encoder=text_encoder.config, latent=latent_space.config)
        self.finisher = finisher.eval() if finisher is not None else None
        if (self.finisher is None) != (self.config.finisher_steps == 0):
            raise ValueError("finisher_steps > 0 needs a finisher transformer, and a finisher needs finisher_steps > 0")

    def with_finisher(self, finisher: torch.nn.Module, steps: int = 1) -> "TextToImagePipeline":
        """This pipeline with `finisher` (same latent space and text features) taking the last `steps` steps.

        A distilled student keeps the layout right but can leave a faint noise floor its own weights do not see;
        its teacher's one last denoising step, without CFG, removes it at the cost of one forward (docs/turbo.md)."""
        check_interchangeable(self.transformer.config, finisher.config, "finisher vs. the pipeline's transformer")
        if steps < 1:
            raise ValueError(f"finisher steps must be >= 1, got {steps}")
        return TextToImagePipeline(self.transformer, self.text_encoder, self.latent_space,
                                   self.config.replace(finisher_steps=steps), finisher)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device) -> "TextToImagePipeline":
        self.transformer.to(device)
        if self.finisher is not None:
            self.finisher.to(device)
        self.latent_space.to(device)
        return self

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer", dtype=dtype)
        if self.finisher is not None:
            self.finisher.save_pretrained(path / "finisher", dtype=dtype)
        self.config.save(path / PIPELINE_CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, text_encoder: TextEncoder | None = None,
                        vae: torch.nn.Module | None = None) -> "TextToImagePipeline":
        path = Path(path) if path is not None else DEFAULT_MODEL
        if not (path / PIPELINE_CONFIG).is_file():
            raise FileNotFoundError(f"no {PIPELINE_CONFIG} in {path}: not an ernielab pipeline folder")
        config = PipelineConfig.load(path / PIPELINE_CONFIG)
        transformer = load_transformer(path / "transformer", dtype=dtype).to(device)
        if text_encoder is None:
            text_encoder = TextEncoder(config.text_encoder)
        if transformer.config.text_in_dim != text_encoder.dim:
            raise ValueError(f"text encoder dim {text_encoder.dim} != transformer text_in_dim "
                             f"{transformer.config.text_in_dim}")
        finisher = None
        if config.finisher_steps > 0:
            if not (path / "finisher").is_dir():
                raise FileNotFoundError(f"{path / PIPELINE_CONFIG} sets finisher_steps but {path / 'finisher'} is missing")
            finisher = load_transformer(path / "finisher", dtype=dtype).to(device)
        return cls(transformer, text_encoder, build_latent_space(config.latent, vae).to(device), config, finisher)

    # ---- generation ----------------------------------------------------------------------------
    def initial_noise(self, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Noise for image i comes from seed + i, so an image does not depend on the batch it is in."""
        shape = self.latent_space.latent_shape(height, width)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, *, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 shift: float | None = None, seed: int = 0, batch_size: int = 16, progress: bool = False,
                 latents: torch.Tensor | None = None, enhance=None) -> torch.Tensor:
        """-> images [N, 3, H, W] in [-1, 1].

        `enhance`: an optional `models.enhancer.PromptEnhancer`; prompt i is rewritten with seed + i
        before encoding. The prompts actually drawn from are kept in `self.revised_prompts`.
        """
        cfg = self.config
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        height, width = height or cfg.height, width or cfg.width
        steps = steps or cfg.steps
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        shift = cfg.shift if shift is None else shift
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        if enhance is not None:
            prompts = enhance.enhance_many(prompts, width=width, height=height, seed=seed, progress=progress)
        self.revised_prompts = list(prompts)
        noise = latents if latents is not None else self.initial_noise(len(prompts), height, width, seed)
        sigmas = sigma_schedule(steps, shift)
        dtype = next(self.transformer.parameters()).dtype
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cond = self.text_encoder(chunk, device=self.device, dtype=dtype)
            uncond = self.text_encoder([negative] * len(chunk), device=self.device, dtype=dtype)
            denoiser = cfg_denoiser(self.transformer, cond, uncond, guidance_scale)
            x = noise[start : start + batch_size].to(self.device, dtype)
            split = len(sigmas) - 1 - min(cfg.finisher_steps, steps - 1)  # the finisher never takes every step
            x = euler_sample(denoiser, x, sigmas[: split + 1], progress=progress and len(prompts) <= batch_size)
            if split < len(sigmas) - 1:
                x = euler_sample(cfg_denoiser(self.finisher, cond, uncond, 1.0), x, sigmas[split:])
            out.append(self.latent_space.decode(x.float()).cpu())
        return torch.cat(out)

    def __call__(self, prompts, **kwargs) -> list[Image.Image]:
        return to_pil(self.generate(prompts, **kwargs))


def describe(path: str | Path) -> dict:
    """Small summary of a saved pipeline (for `ernielab info`)."""
    path = Path(path)
    return {"pipeline": json.loads((path / PIPELINE_CONFIG).read_text()),
            "transformer": json.loads((path / "transformer" / "config.json").read_text())}
