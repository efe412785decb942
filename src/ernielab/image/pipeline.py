"""Text-to-image pipeline: text encoder -> ERNIE-Image transformer + Euler/CFG sampler -> latent decoder.

On disk (`save_pretrained`): pipeline.json (text encoder, latent space, sampling defaults) and
transformer/ (config.json + model.safetensors); a few-step student may also carry finisher/, a second
transformer (e.g. its teacher) that takes the last `finisher_steps` steps without CFG.

`from_pretrained` also takes the ERNIE-Image release as diffusers lays it out (model_index.json and one
subfolder per component) or its hub id; such a pipeline saves back in that layout (`ernielab.image.release`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ernielab.core.config import Config
from ernielab.core.images import to_pil, to_uint8
from ernielab.image.config import check_interchangeable
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.registry import load_transformer
from ernielab.image.release import (MODEL_INDEX, ReleaseParts, is_release_folder, load_release, resolve_release,
                                    save_release)
from ernielab.image.samplers import cfg_denoiser, euler_sample, sigma_schedule
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig
from ernielab.image.transformer import ErnieImageTransformer

PIPELINE_CONFIG = "pipeline.json"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "default"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE = 4096  # pixels; a larger height or width is refused as a mistake


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


@dataclasses.dataclass
class ImagePipelineOutput:
    """What `TextToImagePipeline.__call__` returns (as diffusers' `ErnieImagePipelineOutput`, plus the seeds).

    images: by `output_type`: a list of PIL images ("pil"), uint8 [N, H, W, 3] ("np"), float [N, 3, H, W] in
        [-1, 1] ("pt") or the final latents [N, C, h, w] before decoding ("latent").
    revised_prompts: the prompts the images were drawn from (the enhancer's rewrites, else the prompts given).
    seeds: the noise seed of each image (seed + i); None for each image when `latents` were passed instead.
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    revised_prompts: list[str]
    seeds: list[int | None]


class TextToImagePipeline:
    def __init__(self, transformer: ErnieImageTransformer, text_encoder: TextEncoder, latent_space,
                 config: PipelineConfig | None = None, finisher: torch.nn.Module | None = None):
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.latent_space = latent_space
        self.config = config or PipelineConfig(text_encoder=text_encoder.config, latent=latent_space.config)
        self.finisher = finisher.eval() if finisher is not None else None
        self.release: ReleaseParts | None = None  # set for a pipeline loaded from a release (diffusers) folder
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

    @property
    def prompt_enhancer(self):
        """The release's own prompt enhancer (pe/ + pe_tokenizer/), or None. Off unless passed as `enhancer=`."""
        return self.release.prompt_enhancer if self.release is not None else None

    def to(self, device) -> "TextToImagePipeline":
        """Move every component: transformer, finisher, latent space (VAE), text encoder and a release's enhancer."""
        self.transformer.to(device)
        if self.finisher is not None:
            self.finisher.to(device)
        self.latent_space.to(device)
        if isinstance(self.text_encoder, torch.nn.Module):
            self.text_encoder.to(device)
        if self.prompt_enhancer is not None:
            self.prompt_enhancer.to(device)
        return self

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """An ernielab folder (pipeline.json + transformer/); a release-loaded pipeline is written back in the
        diffusers layout instead (model_index.json + a subfolder per component), loadable by diffusers."""
        if self.release is not None:
            if self.finisher is not None:
                raise ValueError("the diffusers layout has no place for a finisher transformer")
            save_release(self, path, dtype=dtype)
            return
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
        """An ernielab pipeline folder (pipeline.json), a diffusers ERNIE-Image release folder (model_index.json)
        or a hub id of one (HF_HUB_OFFLINE: the local cache only). None: the bundled model."""
        path = Path(path) if path is not None else DEFAULT_MODEL
        if not (path / PIPELINE_CONFIG).is_file():
            if not path.is_dir() and not path.exists():
                path = resolve_release(path)  # a hub id, else FileNotFoundError
            if is_release_folder(path):
                if text_encoder is not None or vae is not None:
                    raise ValueError("a release folder brings its own text encoder and VAE")
                *parts, release = load_release(path, device=device, dtype=dtype)
                pipe = cls(*parts)
                pipe.release = release
                return pipe
            if not (path / PIPELINE_CONFIG).is_file():
                raise FileNotFoundError(f"no {PIPELINE_CONFIG} (ernielab) or {MODEL_INDEX} (diffusers release) in "
                                        f"{path}: not an ernielab pipeline folder")
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

    def check_arguments(self, prompt: str | Sequence[str], *, negative_prompt: str | None = None,
                        height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, shift: float | None = None, seed: int = 0,
                        batch_size: int = 16, latents: torch.Tensor | None = None, output_type: str = "pil") -> dict:
        """The arguments of a call with the pipeline's defaults filled in; ValueError for a bad one. Callers that
        write files (the CLI) check before they create anything."""
        cfg = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        if not isinstance(negative, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
        height = cfg.height if height is None else height
        width = cfg.width if width is None else width
        steps = cfg.steps if num_inference_steps is None else num_inference_steps
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        shift = cfg.shift if shift is None else shift
        _check_int("num_inference_steps", steps, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed)
        for name, side in (("height", height), ("width", width)):
            _check_int(name, side, 1)
            if side > MAX_SIDE:
                raise ValueError(f"{name} must be at most {MAX_SIDE} pixels, got {side}")
        latent_shape = tuple(self.latent_space.latent_shape(height, width))  # raises unless a multiple it can use
        for name, value in (("guidance_scale", guidance_scale), ("shift", shift)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if latents is not None:
            expected = (len(prompts), *latent_shape)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape {expected} ({len(prompts)} prompts at "
                                 f"{height}x{width}), got {got}")

        return {"prompts": prompts, "negative_prompt": negative, "height": height, "width": width,
                "num_inference_steps": steps, "guidance_scale": guidance_scale, "shift": shift}

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, shift: float | None = None, seed: int = 0,
                 batch_size: int = 16, latents: torch.Tensor | None = None, enhancer=None,
                 output_type: str = "pil", progress: bool = False) -> ImagePipelineOutput:
        """Draw one image per prompt; image i starts from the noise of seed `seed + i` (see `initial_noise`).

        None for a sampling argument means the pipeline's own setting (`self.config`). `latents`: the starting
        noise [N, C, h, w] instead of the seeded one. `enhancer`: an optional `enhancer.model.PromptEnhancer`;
        prompt i is rewritten with seed + i before encoding, and the output's `revised_prompts` are the prompts
        actually drawn from. `output_type`: "pil" (list of PIL images), "np" (uint8 [N, H, W, 3]), "pt" (float
        [N, 3, H, W] in [-1, 1]) or "latent" (the final latents, not decoded). Every argument is checked before
        any work; a bad one raises ValueError.
        """
        args = self.check_arguments(prompt, negative_prompt=negative_prompt, height=height, width=width,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    shift=shift, seed=seed, batch_size=batch_size, latents=latents,
                                    output_type=output_type)
        prompts, negative, height, width, steps, guidance_scale, shift = (
            args[k] for k in ("prompts", "negative_prompt", "height", "width", "num_inference_steps",
                              "guidance_scale", "shift"))
        if enhancer is not None:
            prompts = enhancer.enhance_many(prompts, width=width, height=height, seed=seed, progress=progress)
        noise = latents if latents is not None else self.initial_noise(len(prompts), height, width, seed)
        out = self._denoise(prompts, noise, negative=negative, steps=steps, guidance_scale=guidance_scale,
                            shift=shift, batch_size=batch_size, progress=progress,
                            decode=output_type != "latent")
        if output_type == "pil":
            images = to_pil(out)
        elif output_type == "np":
            images = to_uint8(out)
        else:  # "pt": decoded images; "latent": the final latents
            images = out
        seeds = [seed + i for i in range(len(prompts))] if latents is None else [None] * len(prompts)
        return ImagePipelineOutput(images=images, revised_prompts=list(prompts), seeds=seeds)

    @torch.no_grad()
    def _denoise(self, prompts: list[str], noise: torch.Tensor, *, negative: str, steps: int, guidance_scale: float,
                 shift: float, batch_size: int, progress: bool = False, decode: bool = True) -> torch.Tensor:
        """Checked arguments -> images [N, 3, H, W] in [-1, 1] (float32, CPU), or the final latents (float32, CPU)
        when not `decode`. Batches of `batch_size` prompts; the finisher, if any, takes the last steps without CFG."""
        cfg = self.config
        sigmas = sigma_schedule(steps, shift)
        dtype = next(self.transformer.parameters()).dtype
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cond = self.text_encoder(chunk, device=self.device, dtype=dtype)
            uncond = self.text_encoder([negative] * len(chunk), device=self.device, dtype=dtype)
            # a release pipeline rounds timesteps to the transformer's dtype, as diffusers' ErnieImagePipeline does
            denoiser = cfg_denoiser(self.transformer, cond, uncond, guidance_scale,
                                    timestep_dtype=dtype if self.release is not None else None)
            x = noise[start : start + batch_size].to(self.device, dtype)
            split = len(sigmas) - 1 - min(cfg.finisher_steps, steps - 1)  # the finisher never takes every step
            x = euler_sample(denoiser, x, sigmas[: split + 1], progress=progress and len(prompts) <= batch_size)
            if split < len(sigmas) - 1:
                x = euler_sample(cfg_denoiser(self.finisher, cond, uncond, 1.0), x, sigmas[split:])
            out.append((self.latent_space.decode(x.float()) if decode else x.float()).cpu())
        return torch.cat(out)


def _check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def describe(path: str | Path) -> dict:
    """Small summary of a saved pipeline (for `ernielab info`): its checked configs and parameter count."""
    path = Path(path)
    if not (path / PIPELINE_CONFIG).is_file() and is_release_folder(path):  # a diffusers release folder
        from ernielab.image.release import read_model_index

        index = read_model_index(path)
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        if not isinstance(transformer, dict):
            raise ValueError(f"{path / 'transformer' / 'config.json'} must hold a JSON object")
        return {"pipeline": {k: v for k, v in index.items() if not k.startswith("_")}, "transformer": transformer}
    if not (path / PIPELINE_CONFIG).is_file():
        raise FileNotFoundError(f"no {PIPELINE_CONFIG} in {path}: not an ernielab pipeline folder")
    pipeline = PipelineConfig.load(path / PIPELINE_CONFIG)
    transformer = json.loads((path / "transformer" / "config.json").read_text())
    if not isinstance(transformer, dict):
        raise ValueError(f"{path / 'transformer' / 'config.json'} must hold a JSON object")
    return {"pipeline": pipeline.to_dict(), "transformer": transformer}
