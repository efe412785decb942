"""A unified model folder: config.json + model.safetensors, the VQ that decodes its image tokens
(vq_config.json + vq.safetensors) and meta.json (training step, sub-model origin, ...)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ernielab.core.config import ConfigError, read_json_object
from ernielab.unified.config import UnifiedConfig, VQConfig, elastic_from_old
from ernielab.unified.model import UnifiedTransformer
from ernielab.unified.vq import VQTokenizer

MODEL_FILES = ("config.json", "model.safetensors", "vq_config.json", "vq.safetensors")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_vq(folder: str | Path, vq: VQTokenizer, prefix: str = "vq") -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vq.config.save(folder / f"{prefix}_config.json")
    save_file(_state(vq), str(folder / f"{prefix}.safetensors"))


def load_vq(folder: str | Path, prefix: str = "vq") -> VQTokenizer:
    folder = Path(folder)
    cfg_path, weights = folder / f"{prefix}_config.json", folder / f"{prefix}.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no VQ tokenizer ({cfg_path.name} / {weights.name} missing)")
    vq = VQTokenizer(VQConfig.load(cfg_path))
    _load_into(vq, weights)
    return vq.eval()


def _load_into(module: torch.nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config next to them: {str(e).splitlines()[0]}") from None


def save_model(folder: str | Path, model: UnifiedTransformer, vq: VQTokenizer, meta: dict | None = None) -> Path:
    """Write into a temporary folder, then rename: an interrupted save never leaves a broken model."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save(tmp / "config.json")
    save_file(_state(model), str(tmp / "model.safetensors"))
    save_vq(tmp, vq)
    (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_model(folder: str | Path) -> tuple[UnifiedTransformer, VQTokenizer, dict]:
    """(model in eval mode, its VQ tokenizer, meta) from a folder written by save_model."""
    folder = Path(folder)
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a unified model folder (missing {', '.join(missing)})")
    meta_path = folder / "meta.json"
    meta = read_json_object(meta_path) if meta_path.is_file() else {}
    model = UnifiedTransformer(model_config(folder, meta))
    _load_into(model, folder / "model.safetensors")
    vq = load_vq(folder)
    mismatch = vq_mismatch(vq.config, model.config)
    if mismatch:
        raise ValueError(f"{folder}: {mismatch}")
    return model.eval(), vq, meta


def vq_mismatch(vq: VQConfig, model: UnifiedConfig) -> str | None:
    """Why a VQ cannot tokenise images for a model (codebook, grid or scales differ), or None."""
    scales = model.image_scales if model.image_order == "scales" else ()
    if vq.codebook_size != model.codebook_size or vq.grid != model.image_grid or tuple(vq.scales) != tuple(scales):
        return (f"the VQ ({vq.codebook_size} codes, grid {vq.grid}, scales {list(vq.scales)}) does not match the "
                f"model ({model.codebook_size} codes, grid {model.image_grid}, scales {list(scales)})")
    return None


def model_config(folder: Path, meta: dict) -> UnifiedConfig:
    """The folder's UnifiedConfig. A folder written before the elastic settings were a section of the model
    config has them flat in meta.json's training settings (and `elastic_nested` in config.json)."""
    path = folder / "config.json"
    data = read_json_object(path)
    if "elastic" not in data and isinstance(meta.get("train"), dict):
        data["elastic"] = elastic_from_old(meta["train"])
    try:
        return UnifiedConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
