"""LoRA adapters for ERNIE-Image's transformer, built on peft.

Train (`add_lora`, used by `Trainer` when the config has a `lora` section with rank > 0), save (`save_lora`:
diffusers' format, which `ErnieImagePipeline.load_lora_weights` takes, or ComfyUI's), load (`load_lora`: files
written by diffusers, peft, ai-toolkit, ComfyUI, OneTrainer / kohya), mix (`set_adapters`), fuse and unfuse
(`fuse_lora` / `unfuse_lora`) and remove (`unload_lora`). Every function takes a `TextToImagePipeline` (any object
with a `.transformer`) or the transformer itself.

Files name modules by diffusers' `ErnieImageTransformer2DModel` paths (`layers.0.self_attention.to_q`); ernielab's
own module names (`layers.0.attn.to_q`) differ, and `convert.py` maps one to the other. See docs/lora.md.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ernielab.core.config import Config, bounded
from ernielab.image.convert import from_diffusers_state_dict, to_diffusers_state_dict

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PRESETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
FORMATS = ("diffusers", "comfyui")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
COMFYUI_WEIGHT_NAME = "lora_comfyui.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in a LoRA file's metadata
KOHYA_PREFIXES = ("lora_transformer_", "lora_unet_")  # OneTrainer / kohya-style module names


@dataclasses.dataclass
class LoraSettings(Config):
    """The `lora` section of a training config. rank 0 = no LoRA (the whole transformer trains)."""

    rank: int = bounded(0, ge=0)
    alpha: float = bounded(0.0, ge=0)  # 0 = rank (scale 1)
    dropout: float = bounded(0.0, ge=0, lt=1)
    targets: str | list[str] = "attention"  # "attention" | "mlp" | "all" | [module name patterns]
    comfyui: bool = False  # also export the adapter in ComfyUI's convention

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self) -> None:
        super().check()
        if isinstance(self.targets, str) and self.targets not in PRESETS:
            raise ValueError(f"lora.targets: must be one of {list(PRESETS)} or a list of module name patterns, "
                             f"got {self.targets!r}")
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("lora.targets: the list of module name patterns is empty")


# ---- the model side ------------------------------------------------------------------------------
def transformer_of(obj) -> nn.Module:
    """The transformer of a pipeline (anything with a `.transformer` module), or `obj` itself."""
    inner = getattr(obj, "transformer", None)
    module = inner if isinstance(inner, nn.Module) else obj
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a pipeline or a transformer module, got {type(obj).__name__}")
    return module


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _linear_names(model: nn.Module) -> list[str]:
    """Module paths of the Linear layers LoRA can adapt (a layer already adapted counts by its own path)."""
    layers = _lora_layers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(".base_layer")
             and not any(n.startswith(p + ".") for p in layers)]
    return sorted(set(names) | {n for n, m in layers.items() if isinstance(m.get_base_layer(), nn.Linear)})


def _to_diffusers_names(names: list[str]) -> dict[str, str]:
    converted = to_diffusers_state_dict({f"{n}.weight": None for n in names})
    return {n: k.removesuffix(".weight") for n, k in zip(names, converted)}


def _from_diffusers_name(name: str) -> str:
    return next(iter(from_diffusers_state_dict({f"{name}.weight": None}))).removesuffix(".weight")


def target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The module paths (ernielab names) that `targets` selects: a preset ("attention", "mlp", "all") or a list of
    patterns, each a module path suffix (`to_q`, `attn.to_out`) or a regular expression matching whole paths, in
    ernielab's or diffusers' names (`self_attention.to_q`). A pattern that selects no Linear layer is a ValueError."""
    names = _linear_names(model)
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(f"LoRA targets must be one of {list(PRESETS)} or a list of patterns, got {targets!r}")
        chosen = [n for n in names if n.startswith("layers.") and n.endswith(tuple("." + s for s in PRESETS[targets]))]
        if not chosen:
            raise ValueError(f"LoRA targets {targets!r} select no layer of this transformer")
        return chosen
    chosen = set()
    for pattern in targets:
        hits = _match(names, pattern)
        for renamed in (_from_diffusers_name(pattern), _from_diffusers_name("_." + pattern).removeprefix("_.")):
            hits = hits or _match(names, renamed)  # diffusers' names: `self_attention.to_out.0`, `linear_fc2`...
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no Linear layer of the transformer "
                             f"(names like {names[0]!r})")
        chosen.update(hits)
    return sorted(chosen)


def _match(names: list[str], pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None
    return [n for n in names if n == pattern or n.endswith("." + pattern) or (regex and regex.fullmatch(n))]


def _exact(names) -> str:
    """A peft `target_modules` regex that selects exactly these module paths."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def add_lora(obj, rank: int | LoraSettings, alpha: float | None = None, dropout: float = 0.0,
             targets: str | list[str] = "attention", adapter_name: str = "default") -> list[str]:
    """Add a fresh, trainable LoRA adapter (peft's init: B = 0, so the model is unchanged) and freeze everything
    else. -> the adapted module paths."""
    from peft import LoraConfig

    if isinstance(rank, LoraSettings):
        settings = rank
        rank, alpha, dropout, targets = settings.rank, settings.alpha or None, settings.dropout, settings.targets
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model = transformer_of(obj)
    if adapter_name in list_adapters(model):
        raise ValueError(f"the transformer already has a LoRA adapter named {adapter_name!r}")
    names = target_modules(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=_exact(names))
    _inject(config, model, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _lora_layers(model).values():
        for part in (layer.lora_A, layer.lora_B):
            if adapter_name in part:
                part[adapter_name].requires_grad_(True)
    return names


def _inject(config, model: nn.Module, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # peft warns of a second adapter in the model: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def list_adapters(obj) -> list[str]:
    """The names of the LoRA adapters the transformer holds."""
    names: dict[str, None] = {}
    for layer in _lora_layers(transformer_of(obj)).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def active_adapters(obj) -> list[str]:
    layers = list(_lora_layers(transformer_of(obj)).values())
    return list(layers[0].active_adapters) if layers else []


def set_adapters(obj, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
    """Make these adapters the active ones, each scaled by its weight (default 1.0): W + sum_i w_i * alpha_i / r_i *
    B_i A_i. Adapter parameters stay frozen."""
    model = transformer_of(obj)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no LoRA adapter named {unknown[0]!r} (loaded: {known})")
    for layer in _lora_layers(model).values():
        trainable = {id(p): p.requires_grad for p in layer.parameters()}
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for p in layer.parameters():  # peft's set_adapter makes the active adapters trainable; keep what was
            p.requires_grad_(trainable[id(p)])
        for name, weight in zip(names, weights):
            if name in layer.lora_A:
                layer.set_scale(name, float(weight))


def fuse_lora(obj, adapter_names: list[str] | None = None) -> None:
    """Add the (active, or the named) adapters' weighted updates into the base weights (faster sampling)."""
    for layer in _lora_layers(transformer_of(obj)).values():
        names = list(layer.active_adapters) if adapter_names is None else [n for n in adapter_names if n in layer.lora_A]
        if names:
            layer.merge(adapter_names=names)


def unfuse_lora(obj) -> None:
    """Take fused updates back out of the base weights (back to the base, within float rounding)."""
    for layer in _lora_layers(transformer_of(obj)).values():
        while layer.merged:
            layer.unmerge()


def unload_lora(obj, fuse: bool = False) -> None:
    """Remove every adapter: the transformer's modules are plain Linear layers again, holding the base weights
    (fused updates are taken out first) or, with `fuse`, the base plus the active adapters' weighted updates."""
    model = transformer_of(obj)
    unfuse_lora(model)
    if fuse:
        fuse_lora(model)
    for name, layer in sorted(_lora_layers(model).items(), key=lambda kv: -kv[0].count(".")):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if isinstance(getattr(model, "peft_config", None), dict):
        del model.peft_config  # peft's record of the adapters it injected


# ---- adapters <-> files --------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    down: torch.Tensor  # lora_A [r, in]
    up: torch.Tensor  # lora_B [out, r]
    alpha: float | None  # None: the file does not say (alpha = rank, scale 1)


def adapter_state(obj, adapter_name: str = "default") -> dict[str, _Entry]:
    """{diffusers module path: the adapter's A, B and alpha} for one adapter of the transformer."""
    model = transformer_of(obj)
    layers = {n: m for n, m in _lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} (loaded: {list_adapters(model)})")
    names = _to_diffusers_names(sorted(layers))
    return {names[n]: _Entry(m.lora_A[adapter_name].weight.detach(), m.lora_B[adapter_name].weight.detach(),
                             float(m.lora_alpha[adapter_name])) for n, m in sorted(layers.items())}


def save_lora(obj, path: str | Path, adapter_name: str = "default", format: str = "diffusers",
              dtype: torch.dtype | None = None) -> Path:
    """Write one adapter as a safetensors file. `format="diffusers"`: `transformer.<path>.lora_A.weight` /
    `lora_B.weight` with diffusers' LoraConfig metadata (rank, alpha), as `ErnieImagePipeline.load_lora_weights`
    and the transformer's `load_lora_adapter` take it; `"comfyui"`: `diffusion_model.<path>.lora_down.weight` /
    `lora_up.weight` / `.alpha`. A folder path gets diffusers' or ComfyUI's default file name."""
    if format not in FORMATS:
        raise ValueError(f"LoRA format must be one of {FORMATS}, got {format!r}")
    entries = adapter_state(obj, adapter_name)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / (WEIGHT_NAME if format == "diffusers" else COMFYUI_WEIGHT_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)

    def cast(t):
        return t.to(dtype or t.dtype).detach().cpu().contiguous()

    tensors, metadata = {}, {"format": "pt"}
    if format == "diffusers":
        for name, e in entries.items():
            tensors[f"transformer.{name}.lora_A.weight"] = cast(e.down)
            tensors[f"transformer.{name}.lora_B.weight"] = cast(e.up)
        ranks = {n: e.down.shape[0] for n, e in entries.items()}
        alphas = {n: e.alpha for n, e in entries.items()}
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(entries),
                  "rank_pattern": {n: v for n, v in ranks.items() if v != r},
                  "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
        metadata[METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)
    else:
        for name, e in entries.items():
            tensors[f"diffusion_model.{name}.lora_down.weight"] = cast(e.down)
            tensors[f"diffusion_model.{name}.lora_up.weight"] = cast(e.up)
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(e.alpha, dtype=torch.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA safetensors file's tensors and diffusers' LoraConfig metadata (None when absent)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .safetensors LoRA file in the folder, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable {METADATA_KEY} metadata ({e})") from None
    return state, metadata


_DOTTED = re.compile(r"^(?:transformer|diffusion_model|base_model\.model)\.(.+)\.(lora_A|lora_B|lora_down|lora_up)"
                     r"(?:\.default)?\.weight$")
_DOTTED_ALPHA = re.compile(r"^(?:transformer|diffusion_model|base_model\.model)\.(.+)\.alpha$")
_KOHYA = re.compile(r"^(?:" + "|".join(KOHYA_PREFIXES) + r")(.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")


def parse_lora_state(state: dict[str, torch.Tensor], metadata: dict | None, model: nn.Module,
                     source: str = "LoRA") -> dict[str, _Entry]:
    """{ernielab module path: A, B, alpha} from a LoRA state dict in any of the layouts we read (see module doc),
    checked against `model`: an unknown key, a module the transformer lacks or a wrong shape is one ValueError
    naming the key."""
    linear = _linear_names(model)
    to_diffusers = _to_diffusers_names(linear)
    by_diffusers = {d: n for n, d in to_diffusers.items()}
    by_kohya = {d.replace(".", "_"): d for d in by_diffusers}
    parts: dict[str, dict] = collections.defaultdict(dict)
    first_key: dict[str, str] = {}
    for key, tensor in state.items():
        if m := _DOTTED.match(key):
            module, role = m.group(1), {"lora_A": "down", "lora_down": "down"}.get(m.group(2), "up")
        elif m := _DOTTED_ALPHA.match(key):
            module, role = m.group(1), "alpha"
        elif m := _KOHYA.match(key):
            if m.group(1) not in by_kohya:
                raise ValueError(f"{source}: key {key!r} names no layer of this ERNIE-Image transformer "
                                 f"(a LoRA for another model?)")
            module, role = by_kohya[m.group(1)], {"lora_down": "down", "lora_up": "up"}.get(m.group(2), "alpha")
        else:
            raise ValueError(f"{source}: key {key!r} is not a LoRA weight of a layout ernielab reads "
                             f"(diffusers, peft, ai-toolkit, ComfyUI, OneTrainer/kohya)")
        if module not in by_diffusers and module in to_diffusers:  # ernielab's own module names
            module = to_diffusers[module]
        if module not in by_diffusers:
            raise ValueError(f"{source}: key {key!r} names no layer of this ERNIE-Image transformer "
                             f"(a LoRA for another model?)")
        if role in parts[module]:
            raise ValueError(f"{source}: key {key!r} repeats the {role} weight of {module}")
        parts[module][role] = tensor
        first_key.setdefault(module, key)
    if not parts:
        raise ValueError(f"{source}: holds no LoRA weights")
    config = metadata or {}
    meta = {k.removeprefix("transformer."): v for k, v in config.items()}
    entries = {}
    for module, p in parts.items():
        key = first_key[module]
        if "down" not in p or "up" not in p:
            raise ValueError(f"{source}: key {key!r}: {module} has no {'up' if 'down' in p else 'down'} weight")
        base = model.get_submodule(by_diffusers[module])
        base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
        down, up = p["down"], p["up"]
        if (down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[1] != base.in_features
                or up.shape[0] != base.out_features):
            raise ValueError(f"{source}: key {key!r}: shapes {tuple(down.shape)} (down) and {tuple(up.shape)} (up) do "
                             f"not fit {module}, a Linear {base.in_features} -> {base.out_features} "
                             f"(a LoRA for another model?)")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else _meta_alpha(meta, module)
        entries[by_diffusers[module]] = _Entry(down, up, alpha)
    return entries


def _meta_alpha(meta: dict, module: str) -> float | None:
    """The alpha diffusers' LoraConfig metadata gives a module (its alpha_pattern, else lora_alpha)."""
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(meta["lora_alpha"]) if "lora_alpha" in meta else None


def load_lora(obj, path_or_state: str | Path | dict, adapter_name: str | None = None, scale: float = 1.0) -> str:
    """Load a LoRA file (or state dict) as a new adapter, active alongside those already active, at weight `scale`.
    -> the adapter's name (default `adapter_<n>`)."""
    from peft import LoraConfig

    model = transformer_of(obj)
    if isinstance(path_or_state, dict):
        state, metadata, source = path_or_state, None, "LoRA state dict"
    else:
        state, metadata = read_lora_file(path_or_state)
        source = str(path_or_state)
    entries = parse_lora_state(state, metadata, model, source)
    loaded = list_adapters(model)
    if adapter_name is None:
        adapter_name = next(f"adapter_{i}" for i in range(len(loaded) + 1) if f"adapter_{i}" not in loaded)
    if adapter_name in loaded:
        raise ValueError(f"the transformer already has a LoRA adapter named {adapter_name!r}")
    ranks = {n: e.down.shape[0] for n, e in entries.items()}
    alphas = {n: e.alpha if e.alpha is not None else float(ranks[n]) for n, e in entries.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=_exact(entries),
                        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
                        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha})
    active = active_adapters(model)
    weights = _current_weights(model, active)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    _inject(config, model, adapter_name)
    layers = _lora_layers(model)
    with torch.no_grad():
        for name, e in entries.items():
            layer = layers[name]
            if layer.r[adapter_name] != e.down.shape[0] or layer.lora_alpha[adapter_name] != alphas[name]:
                raise RuntimeError(f"peft built {name} with rank {layer.r[adapter_name]}, alpha "
                                   f"{layer.lora_alpha[adapter_name]}; expected {e.down.shape[0]}, {alphas[name]}")
            for target, value in ((layer.lora_A[adapter_name].weight, e.down), (layer.lora_B[adapter_name].weight, e.up)):
                target.copy_(value.to(target.dtype))
    for p in model.parameters():  # loading trains nothing: new adapter frozen, the rest as it was
        p.requires_grad_(trainable.get(id(p), False))
    set_adapters(model, [*active, adapter_name], [*weights, scale])
    return adapter_name


def _current_weights(model: nn.Module, names: list[str]) -> list[float]:
    """The weight `set_adapters` gave each adapter (peft keeps scaling = weight * alpha / r)."""
    out = []
    for name in names:
        layer = next(m for m in _lora_layers(model).values() if name in m.lora_A)
        out.append(layer.scaling[name] * layer.r[name] / layer.lora_alpha[name])
    return out


def effective_deltas(obj, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{ernielab module path: the weight update an adapter (default: the active mix) adds}: for tests and checks."""
    model = transformer_of(obj)
    out = {}
    for name, layer in _lora_layers(model).items():
        names = [adapter_name] if adapter_name else list(layer.active_adapters)
        delta = None
        for n in names:
            if n in layer.lora_A:
                d = layer.get_delta_weight(n)
                delta = d if delta is None else delta + d
        if delta is not None:
            out[name] = delta
    return out
