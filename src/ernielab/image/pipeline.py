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
from ernielab.core.images import to_pil, to_uint8, to_uint8_batch
from ernielab.image.config import check_interchangeable
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.registry import load_transformer
from ernielab.image.release import (MODEL_INDEX, ReleaseParts, is_release_folder, load_release, resolve_release,
                                    save_release)
from ernielab.image.flow_matching import add_noise
from ernielab.image.samplers import cfg_denoiser, euler_sample, img2img_start, sigma_schedule
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig, pad_text
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
    revised_prompts: the prompts the images were drawn from (the enhancer's rewrites, else the prompts given; the
        prompt given where its rewrite failed the enhancer check).
    seeds: the noise seed of each image (seed + k for image k; with `num_images_per_prompt` n, image i of prompt p
        is k = p * n + i); None for each image when `latents` were passed instead.
    enhancer_fallbacks: per image, None where it was drawn from the enhancer's rewrite, else the rejected rewrite
        and why (`EnhancerFallback`); an empty list when no enhancer ran.
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    revised_prompts: list[str]
    seeds: list[int | None]
    enhancer_fallbacks: list["EnhancerFallback | None"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EnhancerFallback:
    """A rewrite the pipeline did not draw from because it contradicts the user's prompt; the prompt was used."""

    rewrite: str
    reasons: list[str]


def resolve_enhancer_check(enhancer, check):
    """The rewrite check to use: "auto" is the enhancer's own `rewrite_check` (None for one without, such as a
    release's pe/), None is no check, or any callable (prompt, rewrite) -> list of reasons it contradicts."""
    if isinstance(check, str) and check == "auto":
        return getattr(enhancer, "rewrite_check", None)
    if check is not None and not callable(check):
        raise ValueError(f'enhancer_check must be "auto", None or a callable (prompt, rewrite) -> reasons, '
                         f"got {type(check).__name__}")
    return check


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
        """Move every component: transformer, finisher, latent space (VAE), text encoder and a release's enhancer.
        Turns model CPU offload off."""
        self._offload_device = None
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

    def check_arguments(self, prompt: str | Sequence[str] | None = None, *,
                        negative_prompt: str | Sequence[str] | None = None,
                        height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, shift: float | None = None, seed: int = 0,
                        batch_size: int = 16, latents: torch.Tensor | None = None, output_type: str = "pil",
                        image=None, strength: float | None = None, mask_image=None, num_images_per_prompt: int = 1,
                        prompt_embeds=None, prompt_embeds_lens=None, negative_prompt_embeds=None,
                        negative_prompt_embeds_lens=None, callback_on_step_end=None) -> dict:
        """The arguments of a call with the pipeline's defaults filled in; ValueError for a bad one. Callers that
        write files (the CLI) check before they create anything. Besides the keys it always had, the result holds
        the images ("image": float [P, 3, H, W] in [-1, 1] or None), the latent-grid mask ("mask": [P, 1, h, w]
        of 0/1 or None), "strength", "num_images_per_prompt", "negative_prompts" (one per prompt) and the
        checked embeddings ("prompt_embeds", "negative_prompt_embeds": (text [P, T, D], lens [P]) or None)."""
        cfg = self.config
        prompts, embeds = _check_prompts(prompt, prompt_embeds, prompt_embeds_lens)
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        negatives = _check_negatives(negative, len(prompts))
        negative_embeds = _check_negative_embeds(negative_prompt, negative_prompt_embeds, negative_prompt_embeds_lens,
                                                 len(prompts))
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
        _check_int("num_images_per_prompt", num_images_per_prompt, 1)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable")
        images = None
        if image is not None:
            images = image_tensor(image)
            if images.shape[0] not in (1, len(prompts)):
                raise ValueError(f"image: give 1 image or one per prompt ({len(prompts)}), got {images.shape[0]}")
            height = images.shape[2] if height is None else height
            width = images.shape[3] if width is None else width
        elif mask_image is not None:
            raise ValueError("mask_image needs image (the picture to repaint)")
        elif strength is not None:
            raise ValueError("strength needs image (image-to-image or inpainting)")
        height = cfg.height if height is None else height
        width = cfg.width if width is None else width
        steps = cfg.steps if num_inference_steps is None else num_inference_steps
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        shift = cfg.shift if shift is None else shift
        latent_shape = self._check_sampling(height, width, steps, guidance_scale, shift, batch_size, seed)
        mask = None
        if images is not None:
            strength, mask = _check_init_image(images, mask_image, strength, height, width, steps, latent_shape,
                                               len(prompts))
        n_images = len(prompts) * num_images_per_prompt
        if latents is not None:
            expected = (n_images, *latent_shape)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape {expected} ({n_images} images at "
                                 f"{height}x{width}), got {got}")
        _check_embed_widths(embeds, negative_embeds, self.transformer.config.text_in_dim)

        return {"prompts": prompts, "negative_prompt": negative, "height": height, "width": width,
                "num_inference_steps": steps, "guidance_scale": guidance_scale, "shift": shift,
                "negative_prompts": negatives, "num_images_per_prompt": num_images_per_prompt, "image": images,
                "mask": mask, "strength": 1.0 if images is None else float(strength), "prompt_embeds": embeds,
                "negative_prompt_embeds": negative_embeds}

    def _check_sampling(self, height, width, steps, guidance_scale, shift, batch_size, seed) -> tuple[int, ...]:
        """Numbers of a call; -> the latent shape [C, h, w] (the latent space refuses sides it cannot use)."""
        _check_int("num_inference_steps", steps, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed)
        for name, side in (("height", height), ("width", width)):
            _check_int(name, side, 1)
            if side > MAX_SIDE:
                raise ValueError(f"{name} must be at most {MAX_SIDE} pixels, got {side}")
        latent_shape = tuple(self.latent_space.latent_shape(height, width))
        for name, value in (("guidance_scale", guidance_scale), ("shift", shift)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return latent_shape

    def encode_prompt(self, prompt: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features (text [N, T, D] right-padded with zeros, float32 on the CPU; lens [N]) to pass back as
        `prompt_embeds=` / `prompt_embeds_lens=` (or the negative ones); they give the same images as the prompts."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self._resident(self.text_encoder):
            text, lens = self.text_encoder(prompts, device="cpu", dtype=torch.float32)
        return text, lens

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, *,
                 negative_prompt: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, shift: float | None = None, seed: int = 0,
                 batch_size: int = 16, latents: torch.Tensor | None = None, enhancer=None,
                 enhancer_check="auto",
                 output_type: str = "pil", progress: bool = False, image=None, strength: float | None = None,
                 mask_image=None, num_images_per_prompt: int = 1, prompt_embeds=None, prompt_embeds_lens=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_lens=None,
                 callback_on_step_end=None) -> ImagePipelineOutput:
        """Draw `num_images_per_prompt` images per prompt; image k (= p * num_images_per_prompt + i, the i-th
        image of prompt p) starts from the noise of seed `seed + k` (see `initial_noise`), so with one image per
        prompt image p uses seed + p as always.

        None for a sampling argument means the pipeline's own setting (`self.config`). `latents`: the starting
        noise [N, C, h, w] instead of the seeded one. `enhancer`: an optional `enhancer.model.PromptEnhancer`;
        prompt i is rewritten with seed + i before encoding, and the output's `revised_prompts` are the prompts
        actually drawn from. `enhancer_check` (see `resolve_enhancer_check`; default: the enhancer's own, which
        for a shapes-world enhancer is `worlds.prompt_facts.contradictions`): a rewrite it finds reasons against
        is dropped and that image is drawn from the prompt itself, as `enhancer_fallbacks` records.
        `output_type`: "pil" (list of PIL images), "np" (uint8 [N, H, W, 3]), "pt" (float [N, 3, H, W] in
        [-1, 1]) or "latent" (the final latents, not decoded). Every argument is checked before
        any work; a bad one raises ValueError.

        `negative_prompt`: one string for all prompts, or a list with one per prompt.
        `prompt_embeds` (+ `prompt_embeds_lens`, and the negative ones): features from `encode_prompt` (text
        [N, T, D] and lens [N], or a list of [T_i, D] tensors) instead of prompts; revised_prompts are then "".
        `image` (PIL image, uint8 HxWx3 / NxHxWx3 array, float tensor [3, H, W] / [N, 3, H, W] in [-1, 1], or a
        list; one for all prompts or one per prompt) with `strength` in (0, 1] (default 0.6): image-to-image. The
        image is encoded, the first (1 - strength) of the steps are skipped (as diffusers' FlowMatch img2img
        pipelines), the image is noised to that step's sigma with the seeded noise and the rest is denoised;
        strength 1 is text-to-image from the same noise. height/width default to the image's size.
        `mask_image` (with `image`; white = repaint; PIL, uint8 HxW array or float tensor in [0, 1] at the image's
        size or the latent grid's): inpainting. The mask is taken to the latent grid by max-pooling (a latent cell
        is repainted if any of its pixels is white); after every step the kept cells are set to the original
        re-noised to that step's sigma, so they end as the original latents.
        `callback_on_step_end(pipe, step, sigma, latents)`: called after each step of each batch (step counts the
        steps this call runs, from 0; sigma is the noise level the latents are now at, decreasing to 0); it may
        return a dict whose "latents" replace the batch's latents.
        """
        args = self.check_arguments(prompt, negative_prompt=negative_prompt, height=height, width=width,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    shift=shift, seed=seed, batch_size=batch_size, latents=latents,
                                    output_type=output_type, image=image, strength=strength, mask_image=mask_image,
                                    num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds,
                                    prompt_embeds_lens=prompt_embeds_lens,
                                    negative_prompt_embeds=negative_prompt_embeds,
                                    negative_prompt_embeds_lens=negative_prompt_embeds_lens,
                                    callback_on_step_end=callback_on_step_end)
        prompts, negative, height, width, steps, guidance_scale, shift = (
            args[k] for k in ("prompts", "negative_prompt", "height", "width", "num_inference_steps",
                              "guidance_scale", "shift"))
        n = args["num_images_per_prompt"]
        embeds, negative_embeds = args["prompt_embeds"], args["negative_prompt_embeds"]
        fallbacks: list[EnhancerFallback | None] = []
        check = resolve_enhancer_check(enhancer, enhancer_check)
        if enhancer is not None:
            if embeds is not None:
                raise ValueError("an enhancer rewrites prompts; it cannot be used with prompt_embeds")
            prompts, fallbacks = self._enhance(prompts, enhancer, check, width=width, height=height, seed=seed,
                                               progress=progress)
        n_prompts = len(prompts)
        negatives = args["negative_prompts"]
        if n > 1:  # image k = p * n + i belongs to prompt p
            prompts = [p for p in prompts for _ in range(n)]
            negatives = [q for q in negatives for _ in range(n)]
            fallbacks = [f for f in fallbacks for _ in range(n)]
        rows = torch.arange(n_prompts).repeat_interleave(n)
        if embeds is not None:
            embeds = (embeds[0][rows], embeds[1][rows])
        if negative_embeds is not None:
            pick = rows if negative_embeds[0].shape[0] == n_prompts else torch.zeros_like(rows)
            negative_embeds = (negative_embeds[0][pick], negative_embeds[1][pick])
        init, mask = args["image"], args["mask"]
        if init is not None:
            init = init[rows] if init.shape[0] == n_prompts else init.expand(len(prompts), -1, -1, -1)
        if mask is not None:
            mask = mask[rows] if mask.shape[0] == n_prompts else mask.expand(len(prompts), -1, -1, -1)
        noise = latents if latents is not None else self.initial_noise(len(prompts), height, width, seed)
        negative_arg = negative if isinstance(negative, str) and n_prompts == len(prompts) else negatives
        out = self._denoise(prompts, noise, negative=negative_arg, steps=steps, guidance_scale=guidance_scale,
                            shift=shift, batch_size=batch_size, progress=progress,
                            decode=output_type != "latent", embeds=embeds, negative_embeds=negative_embeds,
                            image=init, strength=args["strength"], mask=mask, callback=callback_on_step_end)
        if output_type == "pil":
            images = to_pil(out)
        elif output_type == "np":
            images = to_uint8(out)
        else:  # "pt": decoded images; "latent": the final latents
            images = out
        seeds = [seed + i for i in range(len(prompts))] if latents is None else [None] * len(prompts)
        return ImagePipelineOutput(images=images, revised_prompts=list(prompts), seeds=seeds,
                                   enhancer_fallbacks=fallbacks)

    @staticmethod
    def _enhance(prompts: list[str], enhancer, check, *, width: int, height: int, seed: int,
                 progress: bool) -> tuple[list[str], list[EnhancerFallback | None]]:
        """Prompt i rewritten with seed + i; where `check` finds the rewrite contradicts the prompt, the prompt."""
        rewrites = enhancer.enhance_many(prompts, width=width, height=height, seed=seed, progress=progress)
        used, fallbacks = [], []
        for prompt, rewrite in zip(prompts, rewrites):
            reasons = list(check(prompt, rewrite)) if check is not None else []
            used.append(prompt if reasons else rewrite)
            fallbacks.append(EnhancerFallback(rewrite, reasons) if reasons else None)
        return used, fallbacks

    @torch.no_grad()
    def _denoise(self, prompts: list[str], noise: torch.Tensor, *, negative: str | list[str], steps: int,
                 guidance_scale: float, shift: float, batch_size: int, progress: bool = False, decode: bool = True,
                 embeds=None, negative_embeds=None, image: torch.Tensor | None = None, strength: float = 1.0,
                 mask: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Checked arguments -> images [N, 3, H, W] in [-1, 1] (float32, CPU), or the final latents (float32, CPU)
        when not `decode`. Batches of `batch_size` prompts; the finisher, if any, takes the last steps without CFG.
        `negative`: one string or one per prompt; `embeds` / `negative_embeds`: (text, lens) per image instead of
        the prompts / negatives; `image` [N, 3, H, W] with `strength`: img2img; `mask` [N, 1, h, w]: inpainting."""
        cfg = self.config
        sigmas = sigma_schedule(steps, shift)
        if image is not None:
            sigmas = sigmas[img2img_start(steps, strength):]
        run_steps = len(sigmas) - 1
        dtype = next(self.transformer.parameters()).dtype
        device = self.execution_device
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            stop = start + len(chunk)
            with self._resident(self.text_encoder):
                cond = (_chunk_embeds(embeds, start, stop, device, dtype) if embeds is not None
                        else self.text_encoder(chunk, device=device, dtype=dtype))
                if negative_embeds is not None:
                    uncond = _chunk_embeds(negative_embeds, start, stop, device, dtype)
                else:
                    neg = [negative] * len(chunk) if isinstance(negative, str) else negative[start:stop]
                    uncond = self.text_encoder(neg, device=device, dtype=dtype)
            x = noise[start:stop].to(device, dtype)
            x0 = None
            if image is not None and (strength < 1 or mask is not None):
                with self._resident(self.latent_space):
                    x0 = self.latent_space.encode(image[start:stop].to(device)).float()
                if strength < 1:  # the image noised to the first sigma run, with the seeded noise
                    x = add_noise(x0, x.float(), sigmas[:1].expand(len(chunk)).to(device)).to(dtype)
            step_callback = self._step_callback(callback, x0, None if mask is None else mask[start:stop], sigmas)
            # a release pipeline rounds timesteps to the transformer's dtype, as diffusers' ErnieImagePipeline does
            denoiser = cfg_denoiser(self.transformer, cond, uncond, guidance_scale,
                                    timestep_dtype=dtype if self.release is not None else None)
            split = run_steps - min(cfg.finisher_steps, run_steps - 1)  # the finisher never takes every step
            if step_callback is not None:  # the noise the inpainting blend re-noises the original with
                step_callback.noise = noise[start:stop].to(device, dtype)
            with self._resident(self.transformer):
                x = euler_sample(denoiser, x, sigmas[: split + 1], progress=progress and len(prompts) <= batch_size,
                                 callback=step_callback)
            if split < run_steps:
                if step_callback is not None:
                    step_callback.offset = split
                with self._resident(self.finisher):
                    x = euler_sample(cfg_denoiser(self.finisher, cond, uncond, 1.0), x, sigmas[split:],
                                     callback=step_callback)
            if decode:
                with self._resident(self.latent_space):
                    x = self.latent_space.decode(x.float())
            out.append(x.float().cpu())
        return torch.cat(out)

    def _step_callback(self, callback, x0, mask, sigmas):
        """The per-step hook euler_sample runs: the inpainting blend, then the user's callback; None if neither."""
        if callback is None and mask is None:
            return None
        pipe = self

        class StepHook:
            offset = 0
            noise: torch.Tensor

            def __call__(self, i: int, x: torch.Tensor):
                step = self.offset + i
                sigma = sigmas[step + 1]
                replaced = None
                if mask is not None:
                    known = add_noise(x0, self.noise.float(), sigma.expand(x.shape[0]).to(x.device))
                    m = mask.to(x.device, torch.float32)
                    x = ((1 - m) * known + m * x.float()).to(x.dtype)
                    replaced = x
                if callback is not None:
                    result = callback(pipe, step, float(sigma), x)
                    if result is not None:
                        if not isinstance(result, dict):
                            raise TypeError("callback_on_step_end must return None or a dict")
                        if "latents" in result:
                            new = result["latents"]
                            if not isinstance(new, torch.Tensor) or new.shape != x.shape:
                                raise ValueError(f"callback_on_step_end returned latents of shape "
                                                 f"{getattr(new, 'shape', None)}; expected {tuple(x.shape)}")
                            replaced = new.to(x.device, x.dtype)
                return replaced

        return StepHook()

    # ---- memory: model CPU offload and VAE tiling ----------------------------------------------
    @property
    def execution_device(self) -> torch.device:
        """Where the models run: the offload device after `enable_model_cpu_offload`, else `device`."""
        return self._offload_device if getattr(self, "_offload_device", None) is not None else self.device

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> "TextToImagePipeline":
        """Keep every component on the CPU and move each to `device` only while it runs (text encoder, then the
        transformer, the finisher, the latent space), then back: peak accelerator memory is the largest component
        rather than all of them. Images are the same as with everything on `device`. `to()` turns it off."""
        self.to("cpu")
        self._offload_device = torch.device(device)
        return self

    def _resident(self, module):
        """Context: `module` on the execution device while it runs, when offloading; otherwise nothing."""
        import contextlib

        device = getattr(self, "_offload_device", None)
        if device is None or module is None or not hasattr(module, "to"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def resident():
            module.to(device)
            try:
                yield
            finally:
                module.to("cpu")

        return resident()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images tile by tile: delegated to the latent space's diffusers VAE."""
        vae = getattr(self.latent_space, "vae", None)
        if vae is None or not hasattr(vae, "enable_tiling"):
            raise ValueError(f"VAE tiling needs a diffusers VAE latent space; this pipeline's latent space is "
                             f"{self.config.latent.kind!r} ({type(self.latent_space).__name__}), which has no VAE "
                             "to tile")
        vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        vae = getattr(self.latent_space, "vae", None)
        if vae is not None and hasattr(vae, "disable_tiling"):
            vae.disable_tiling()


DEFAULT_STRENGTH = 0.6  # img2img / inpainting when `strength` is not given, as diffusers' pipelines


def image_tensor(image) -> torch.Tensor:
    """Images for img2img as float [N, 3, H, W] in [-1, 1]: a PIL image, a uint8 HxWx3 (or HxW) array, an
    NxHxWx3 uint8 array, a float tensor [3, H, W] / [N, 3, H, W] in [-1, 1] (or uint8), or a list of these."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        x = image.detach().cpu().float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image tensors must be [3, H, W] or [N, 3, H, W], got {tuple(image.shape)}")
        if not torch.isfinite(x).all() or x.min() < -1.001 or x.max() > 1.001:
            raise ValueError("float image tensors must hold values in [-1, 1]")
        return x.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        image = [image]
    elif isinstance(image, np.ndarray) and image.ndim in (2, 3):
        image = [image]
    elif isinstance(image, Image.Image):
        image = [image]
    try:
        batch = to_uint8_batch(image)
    except TypeError:
        raise ValueError(f"image must be a PIL image, a uint8 array or a tensor, got {type(image).__name__}") from None
    return batch.float() / 127.5 - 1


def mask_tensor(mask, image_size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """An inpainting mask (white / 1 = repaint) as 0/1 float [N, 1, h, w] on the latent grid. Accepts a PIL
    image, a uint8 HxW (or HxWx3) array, a float tensor [H, W] / [1, H, W] / [N, 1, H, W] in [0, 1], or a list;
    its size must be the image's (H, W) or the latent grid's (h, w). Float / bool arrays are read as tensors."""
    if isinstance(mask, np.ndarray) and mask.dtype != np.uint8:
        if mask.dtype != bool and not np.issubdtype(mask.dtype, np.floating):
            raise ValueError(f"mask arrays must be uint8 (0-255), bool or float in [0, 1], got {mask.dtype}")
        mask = torch.from_numpy(mask.astype(np.float32))
    if isinstance(mask, torch.Tensor):
        m = mask.detach().cpu()
        m = m.float() / 255 if m.dtype == torch.uint8 else m.float()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] != 1 else m[None]
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"mask tensors must be [H, W], [1, H, W] or [N, 1, H, W], got {tuple(mask.shape)}")
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError("float mask tensors must hold values in [0, 1]")
    else:
        items = mask if isinstance(mask, (list, tuple)) else [mask]
        arrays = []
        for item in items:
            if isinstance(item, Image.Image):
                a = np.asarray(item.convert("L"))
            else:
                a = np.asarray(item)
                if a.dtype != np.uint8:
                    raise ValueError(f"mask arrays must be uint8, got {a.dtype}")
                if a.ndim == 3 and a.shape[2] in (1, 3):
                    a = a[..., 0] if a.shape[2] == 1 else np.asarray(Image.fromarray(a).convert("L"))
            if a.ndim != 2:
                raise ValueError(f"a mask must be one channel HxW, got shape {a.shape}")
            if arrays and a.shape != arrays[0].shape:
                raise ValueError("masks must all have the same size")
            arrays.append(a)
        if not arrays:
            raise ValueError("no mask given")
        m = torch.from_numpy(np.stack(arrays)).float()[:, None] / 255
    size = tuple(m.shape[2:])
    if size not in (tuple(image_size), tuple(latent_size)):
        raise ValueError(f"mask is {size[0]}x{size[1]} but must match the image ({image_size[0]}x{image_size[1]}) "
                         f"or the latent grid ({latent_size[0]}x{latent_size[1]})")
    m = (m > 0.5).float()
    if size != tuple(latent_size):
        m = torch.nn.functional.adaptive_max_pool2d(m, tuple(latent_size))
    return m


def _check_embeds(name: str, embeds, lens) -> tuple[torch.Tensor, torch.Tensor]:
    """(text [N, T, D] float, lens [N] long) from a tensor (+ lens, default: all of T) or a list of [T_i, D]."""
    if isinstance(embeds, (list, tuple)):
        if lens is not None:
            raise ValueError(f"{name} as a list of [T_i, D] tensors takes no lens")
        if not embeds or not all(isinstance(e, torch.Tensor) and e.ndim == 2 and e.shape[0] > 0 for e in embeds):
            raise ValueError(f"{name} as a list must hold [T_i, D] tensors")
        if len({e.shape[1] for e in embeds}) != 1:
            raise ValueError(f"{name}: all tensors must have the same width D")
        return pad_text([e.detach().cpu().float() for e in embeds])
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"{name} must be a tensor [N, T, D] (or a list of [T_i, D] tensors)")
    n, t = embeds.shape[:2]
    if lens is None:
        lens = torch.full((n,), t, dtype=torch.long)
    lens = torch.as_tensor(lens).cpu()
    if lens.shape != (n,) or lens.is_floating_point() or (lens < 1).any() or (lens > t).any():
        raise ValueError(f"{name}_lens must hold {n} integers in [1, {t}]")
    return embeds.detach().cpu(), lens.long()


def _chunk_embeds(embeds: tuple[torch.Tensor, torch.Tensor], start: int, stop: int, device, dtype):
    """Rows start:stop of (text, lens) padded as the text encoder pads a batch (to its own longest row)."""
    text, lens = embeds
    return pad_text([text[i, : int(lens[i])].float() for i in range(start, stop)], device=device, dtype=dtype)



def _check_prompts(prompt, prompt_embeds, prompt_embeds_lens) -> tuple[list[str], tuple | None]:
    """-> (prompts, checked embeddings or None); prompts are "" when drawn from embeddings."""
    if prompt_embeds is not None:
        if prompt is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        embeds = _check_embeds("prompt_embeds", prompt_embeds, prompt_embeds_lens)
        prompts = [""] * embeds[0].shape[0]
    else:
        if prompt is None:
            raise ValueError("no prompts given (pass prompt or prompt_embeds)")
        if prompt_embeds_lens is not None:
            raise ValueError("prompt_embeds_lens needs prompt_embeds")
        embeds = None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompts given")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    return prompts, embeds


def _check_negatives(negative, n_prompts: int) -> list[str]:
    """One negative prompt per prompt, from a string or a list of them."""
    if isinstance(negative, str):
        return [negative] * n_prompts
    if isinstance(negative, Sequence) and all(isinstance(n, str) for n in negative):
        if len(negative) != n_prompts:
            raise ValueError(f"negative_prompt as a list needs one per prompt: {n_prompts} prompts, "
                             f"{len(negative)} negative prompts")
        return list(negative)
    raise ValueError(f"negative_prompt must be a string or a list of strings, got {type(negative).__name__}")


def _check_negative_embeds(negative_prompt, embeds, lens, n_prompts: int) -> tuple | None:
    if embeds is None:
        if lens is not None:
            raise ValueError("negative_prompt_embeds_lens needs negative_prompt_embeds")
        return None
    if negative_prompt is not None:
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    checked = _check_embeds("negative_prompt_embeds", embeds, lens)
    if checked[0].shape[0] not in (1, n_prompts):
        raise ValueError(f"negative_prompt_embeds must hold 1 or {n_prompts} (one per prompt) rows, got "
                         f"{checked[0].shape[0]}")
    return checked


def _check_init_image(images: torch.Tensor, mask_image, strength, height: int, width: int, steps: int,
                      latent_shape: tuple[int, ...], n_prompts: int) -> tuple[float, torch.Tensor | None]:
    """img2img / inpainting inputs; -> (strength, latent-grid mask or None)."""
    if tuple(images.shape[2:]) != (height, width):
        raise ValueError(f"image is {images.shape[2]}x{images.shape[3]} but the call draws {height}x{width} "
                         "(height x width); resize the image or leave height/width unset")
    if strength is None:
        strength = DEFAULT_STRENGTH
    if (isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength)
            or not 0 < strength <= 1):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if img2img_start(steps, strength) >= steps:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise strength or "
                         "num_inference_steps")
    mask = None
    if mask_image is not None:
        mask = mask_tensor(mask_image, (height, width), latent_shape[1:])
        if mask.shape[0] not in (1, n_prompts):
            raise ValueError(f"mask_image: give 1 mask or one per prompt ({n_prompts}), got {mask.shape[0]}")
    return strength, mask


def _check_embed_widths(embeds, negative_embeds, text_in_dim: int) -> None:
    if embeds is None and negative_embeds is None:
        return
    dim = embeds[0].shape[-1] if embeds is not None else negative_embeds[0].shape[-1]
    if negative_embeds is not None and embeds is not None and negative_embeds[0].shape[-1] != dim:
        raise ValueError("prompt_embeds and negative_prompt_embeds have different widths")
    if dim != text_in_dim:
        raise ValueError(f"prompt embeddings are {dim} wide but the transformer takes {text_in_dim}")

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
