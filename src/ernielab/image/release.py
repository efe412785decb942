"""The ERNIE-Image release as its users name it: a diffusers folder (model_index.json) or a hub id.

- `resolve_release(name)`: a local folder, else a Hugging Face hub id through `snapshot_download` (the
  cache only when HF_HUB_OFFLINE is set); one FileNotFoundError when neither works.
- `load_release(path)`: every component from its own subfolder, each checked against the class the release
  uses: transformer/ (ErnieImageTransformer2DModel -> ernielab's ErnieImageTransformer), vae/
  (AutoencoderKLFlux2, 2x2 patchify + BatchNorm statistics, eps 1e-5), text_encoder/ + tokenizer/
  (Mistral3Model, `hidden_states[-2]`, whole prompts), scheduler/ (FlowMatchEulerDiscreteScheduler, static
  shift), and the optional prompt enhancer pe/ + pe_tokenizer/ (`ReleasePromptEnhancer`).
- `save_release(pipeline, path)`: the same layout back, loadable by diffusers' ErnieImagePipeline.
- `save_single_file` / `load_single_file`: the transformer as one safetensors file with ComfyUI's
  `model.diffusion_model.` key prefix (diffusers key names after it; the config in the file's metadata).

diffusers and transformers are imported only inside these functions (they are heavy).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

MODEL_INDEX = "model_index.json"
COMFY_PREFIX = "model.diffusion_model."
SINGLE_FILE_CONFIG_KEY = "ernie_image_config"

# component -> (library, accepted class names); tokenizers may be of any transformers tokenizer class
REQUIRED = {
    "transformer": ("diffusers", ("ErnieImageTransformer2DModel",)),
    "vae": ("diffusers", ("AutoencoderKLFlux2",)),
    "text_encoder": ("transformers", ("Mistral3Model",)),
    "tokenizer": ("transformers", None),
    "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler",)),
}
OPTIONAL = {
    "pe": ("transformers", ("Ministral3ForCausalLM",)),
    "pe_tokenizer": ("transformers", None),
}
# scheduler options that would change the sigmas away from "linspace, then the static shift"
_SCHEDULER_DEFAULTS = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                       "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                       "stochastic_sampling": False, "num_train_timesteps": 1000}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- finding the folder ----------------------------------------------------------------------------
def is_release_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(str(name))) and not str(name).startswith(".")


def resolve_release(name: str | Path) -> Path:
    """A local folder as is; else a hub id downloaded (or, offline, found in the cache) with snapshot_download.

    FileNotFoundError, one sentence, when it is neither."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name} is a file, not a pipeline folder")
    if not looks_like_hub_id(str(name)):
        raise FileNotFoundError(f"{name} does not exist (a pipeline folder with pipeline.json or model_index.json, "
                                f"or a Hugging Face hub id such as owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name)))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "it could not be downloaded and is not in the local cache"
        raise FileNotFoundError(f"{name} is not a local folder, and as a Hugging Face hub id {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(f"{name} is not a local folder and could not be fetched from the Hugging Face hub: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---- checking the folder ---------------------------------------------------------------------------
def read_model_index(path: Path) -> dict:
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MODEL_INDEX} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path / MODEL_INDEX} must hold a JSON object")
    for name, (library, classes) in {**REQUIRED, **OPTIONAL}.items():
        entry = index.get(name)
        if entry is None or (isinstance(entry, list) and entry[:1] == [None]):
            if name in REQUIRED:
                raise ValueError(f"{path / MODEL_INDEX} names no {name!r} component (an ERNIE-Image release needs "
                                 f"{', '.join(REQUIRED)})")
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"{path / MODEL_INDEX}: {name!r} must be [library, class], got {entry!r}")
        if classes is not None and entry[1] not in classes:
            raise ValueError(f"{path / MODEL_INDEX}: {name!r} is a {entry[1]}, an ERNIE-Image release needs "
                             f"{' or '.join(classes)}")
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / MODEL_INDEX} names a {name!r} component but {path / name} is missing")
    return index


def _component_config(folder: Path, file: str = "config.json") -> dict:
    if not (folder / file).is_file():
        raise FileNotFoundError(f"{folder / file} is missing")
    try:
        cfg = json.loads((folder / file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / file} must hold a JSON object")
    return cfg


def _check_diffusers_class(folder: Path, expected: Sequence[str], file: str = "config.json") -> dict:
    cfg = _component_config(folder, file)
    got = cfg.get("_class_name")
    if got not in expected:
        raise ValueError(f"{folder / file} is a {got}, an ERNIE-Image release needs {' or '.join(expected)}")
    return cfg


def _check_transformers_model_type(folder: Path, expected: Sequence[str], cls: str) -> dict:
    """By model_type, not `architectures`: a checkpoint saved from another head class of the same model (e.g.
    Mistral3ForConditionalGeneration for Mistral3Model) loads fine."""
    cfg = _component_config(folder)
    got = cfg.get("model_type")
    if got not in expected:
        raise ValueError(f"{folder / 'config.json'} is a {got!r} model, an ERNIE-Image release needs a {cls} "
                         f"(model_type {' or '.join(map(repr, expected))})")
    return cfg


def scheduler_shift(config: dict, where: Path) -> float:
    """The static shift of a FlowMatchEulerDiscreteScheduler config; ValueError for options ernielab's Euler
    sampler does not reproduce."""
    for key, default in _SCHEDULER_DEFAULTS.items():
        if config.get(key, default) != default:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (ernielab samples with a static shift "
                             f"over {_SCHEDULER_DEFAULTS['num_train_timesteps']} timesteps)")
    shift = config.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"{where}: shift must be a positive number, got {shift!r}")
    return float(shift)


# ---- the prompt enhancer -----------------------------------------------------------------------------
class ReleasePromptEnhancer:
    """The release's pe/ (a causal LM) with pe_tokenizer/, formatted exactly as diffusers' ErnieImagePipeline:
    a JSON user message {"prompt", "width", "height"} through the chat template, no system message,
    add_generation_prompt=False, tokenised with the tokenizer's special tokens (BOS); only the new tokens are
    decoded. Sampling: temperature 0.6, top-p 0.95 (diffusers samples unless temperature and top_p are both 1.0;
    temperature 0 here means greedy). Prompt i is drawn with seed + i."""

    def __init__(self, model, tokenizer, *, temperature: float = 0.6, top_p: float = 0.95,
                 max_new_tokens: int | None = None, system_prompt: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt

    def messages(self, prompt: str, width: int = 1024, height: int = 1024) -> list[dict]:
        user = json.dumps({"prompt": prompt, "width": width, "height": height}, ensure_ascii=False)
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": user}]

    def input_ids(self, prompt: str, width: int = 1024, height: int = 1024) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(self.messages(prompt, width, height), tokenize=False,
                                                  add_generation_prompt=False)
        return self.tokenizer(text, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def enhance(self, prompt: str, width: int = 1024, height: int = 1024, seed: int = 0) -> str:
        ids = self.input_ids(prompt, width, height).to(self.model.device)
        sample = self.temperature > 0 and (self.temperature != 1.0 or self.top_p != 1.0)
        kwargs = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if sample else \
            dict(do_sample=False)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens or self.tokenizer.model_max_length,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **kwargs)
        return self.tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()

    def enhance_many(self, prompts: Sequence[str], width: int = 1024, height: int = 1024, seed: int = 0,
                     progress: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        return [self.enhance(p, width, height, seed + i)
                for i, p in enumerate(tqdm(list(prompts), disable=not progress, desc="enhancing", leave=False))]

    def to(self, device) -> "ReleasePromptEnhancer":
        self.model.to(device)
        return self


# ---- loading -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReleaseParts:
    """What a release-loaded pipeline keeps beside its transformer / text encoder / latent space, to save back."""

    model_index: dict
    scheduler_config: dict
    vae: Any
    prompt_enhancer: ReleasePromptEnhancer | None = None


def load_release(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """-> (transformer, text_encoder, latent_space, PipelineConfig, ReleaseParts) from a release folder."""
    path = Path(path)
    read_model_index(path)
    import diffusers
    import transformers
    from transformers.utils import logging as hf_logging

    from ernielab.image.latents import LatentSpaceConfig, build_latent_space
    from ernielab.image.pipeline import PipelineConfig
    from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig
    from ernielab.image.transformer import ErnieImageTransformer

    hf_logging.disable_progress_bar()
    _check_diffusers_class(path / "transformer", REQUIRED["transformer"][1])
    transformer = ErnieImageTransformer.from_pretrained(path / "transformer", dtype=dtype).to(device)

    _check_diffusers_class(path / "vae", REQUIRED["vae"][1])
    vae = diffusers.AutoencoderKLFlux2.from_pretrained(path / "vae", torch_dtype=dtype)
    latent = LatentSpaceConfig(kind="diffusers", patch_size=2, vae_path=str(path / "vae"))
    latent_space = build_latent_space(latent, vae)
    expected = latent_space.channels
    if transformer.config.in_channels != expected or transformer.config.out_channels != expected:
        raise ValueError(f"transformer/ takes {transformer.config.in_channels} latent channels, the vae/ gives "
                         f"{expected} (32 x 2 x 2 in the release)")
    if getattr(vae, "bn", None) is None or vae.bn.running_mean.numel() != expected:
        raise ValueError(f"{path / 'vae'} has no BatchNorm statistics over {expected} patchified channels")

    _check_transformers_model_type(path / "text_encoder", ("mistral3",), "Mistral3Model")
    te_config = TextEncoderConfig(name=str(path / "text_encoder"), hidden_layer=-2, max_length=None,
                                  tokenizer=str(path / "tokenizer"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
    te_model = transformers.Mistral3Model.from_pretrained(path / "text_encoder", dtype=dtype)
    text_encoder = TextEncoder(te_config, model=te_model, tokenizer=tokenizer).to(device)
    if transformer.config.text_in_dim != text_encoder.dim:
        raise ValueError(f"text_encoder/ gives {text_encoder.dim}-wide features, transformer/ takes text_in_dim "
                         f"{transformer.config.text_in_dim}")

    scheduler_config = _check_diffusers_class(path / "scheduler", REQUIRED["scheduler"][1], "scheduler_config.json")
    shift = scheduler_shift(scheduler_config, path / "scheduler" / "scheduler_config.json")

    index = read_model_index(path)
    enhancer = None
    if index.get("pe") and index.get("pe_tokenizer") and index["pe"][0] is not None:
        _check_transformers_model_type(path / "pe", ("ministral3", "mistral"), "Ministral3ForCausalLM")
        pe = transformers.Ministral3ForCausalLM.from_pretrained(path / "pe", dtype=dtype).to(device)
        enhancer = ReleasePromptEnhancer(pe, transformers.AutoTokenizer.from_pretrained(path / "pe_tokenizer"))
    config = PipelineConfig(text_encoder=te_config, latent=latent, height=1024, width=1024, steps=50,
                            guidance_scale=4.0, shift=shift, negative_prompt="")
    return (transformer, text_encoder, latent_space.to(device), config,
            ReleaseParts(index, scheduler_config, vae, enhancer))


# ---- saving ------------------------------------------------------------------------------------------
def transformer_diffusers_config(transformer) -> dict:
    import diffusers

    return {"_class_name": "ErnieImageTransformer2DModel", "_diffusers_version": diffusers.__version__,
            **transformer.config.to_diffusers()}


def save_release(pipeline, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a release-loaded pipeline back in the diffusers layout (model_index.json + one subfolder per
    component). `dtype` casts the transformer's weights; the other components are saved as they are."""
    import diffusers
    from safetensors.torch import save_file

    parts: ReleaseParts = pipeline.release
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(pipeline.transformer, "to_diffusers_state_dict"):
        raise ValueError(f"a {type(pipeline.transformer).__name__} has no diffusers layout")
    out = path / "transformer"
    out.mkdir(exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
             for k, v in pipeline.transformer.to_diffusers_state_dict().items()}
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(transformer_diffusers_config(pipeline.transformer), indent=2))

    parts.vae.save_pretrained(path / "vae")
    pipeline.text_encoder.model.save_pretrained(path / "text_encoder")
    pipeline.text_encoder.tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    scheduler = {**parts.scheduler_config, "shift": pipeline.config.shift}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "ErnieImagePipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "ErnieImageTransformer2DModel"],
             "vae": ["diffusers", type(parts.vae).__name__],
             "text_encoder": ["transformers", type(pipeline.text_encoder.model).__name__],
             "tokenizer": ["transformers", type(pipeline.text_encoder.tokenizer).__name__],
             "scheduler": ["diffusers", parts.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")]}
    pe = parts.prompt_enhancer
    if pe is not None:
        pe.model.save_pretrained(path / "pe")
        pe.tokenizer.save_pretrained(path / "pe_tokenizer")
        index["pe"] = ["transformers", type(pe.model).__name__]
        index["pe_tokenizer"] = ["transformers", type(pe.tokenizer).__name__]
    else:
        index["pe"], index["pe_tokenizer"] = [None, None], [None, None]
        for name in ("pe", "pe_tokenizer"):
            if (path / name).is_dir():
                shutil.rmtree(path / name)
    (path / MODEL_INDEX).write_text(json.dumps(index, indent=2))


# ---- single-file transformer checkpoints -------------------------------------------------------------------
def save_single_file(transformer, file: str | Path, prefix: str = COMFY_PREFIX,
                     dtype: torch.dtype | None = None) -> None:
    """The transformer as one safetensors file: diffusers key names behind `prefix` (ComfyUI's
    `model.diffusion_model.`; "" for none), the diffusers config as JSON in the metadata."""
    from safetensors.torch import save_file

    state = {prefix + k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
             for k, v in transformer.to_diffusers_state_dict().items()}
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt",
                                          SINGLE_FILE_CONFIG_KEY: json.dumps(transformer.config.to_diffusers())})


def _infer_config(state: dict[str, torch.Tensor]) -> dict:
    """A diffusers config from the weights; RoPE axes and theta cannot be read off them: the release's."""
    from ernielab.image.config import ErnieImageConfig

    try:
        w = state["x_embedder.proj.weight"]
        hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
        head_dim = state["layers.0.self_attention.norm_q.weight"].shape[0]
        out = state["final_linear.weight"].shape[0] // patch**2
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        ffn = state["layers.0.mlp.linear_fc2.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not an ERNIE-Image transformer checkpoint: no {e.args[0]!r} weight") from None
    text = state.get("text_proj.weight")
    release = ErnieImageConfig.release()
    return dict(hidden_size=hidden, num_attention_heads=hidden // head_dim, num_layers=layers, ffn_hidden_size=ffn,
                in_channels=in_channels, out_channels=out, patch_size=patch,
                text_in_dim=text.shape[1] if text is not None else hidden, rope_theta=release.rope_theta,
                rope_axes_dim=list(release.rope_axes_dim), eps=release.eps, qk_layernorm=True)


def load_single_file(file: str | Path, config: dict | None = None, dtype: torch.dtype = torch.float32):
    """An ErnieImageTransformer from one safetensors file, with or without ComfyUI's `model.diffusion_model.`
    prefix, in diffusers key names. The config: `config` if given, else the file's metadata, else read off the
    weights' shapes (with the release's RoPE settings)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ernielab.image.transformer import ErnieImageTransformer

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint file {file}")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(file))
    if any(k.startswith(COMFY_PREFIX) for k in state):
        state = {k[len(COMFY_PREFIX):]: v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    if config is None:
        config = json.loads(meta[SINGLE_FILE_CONFIG_KEY]) if SINGLE_FILE_CONFIG_KEY in meta else _infer_config(state)
    return ErnieImageTransformer.from_diffusers(config, state, dtype, copy=False)
