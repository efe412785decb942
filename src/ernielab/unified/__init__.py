"""ERNIE 5.0-style unified autoregressive model: text + VQ image tokens, one MoE trunk, elastic sub-models.

The names below load their module on first use (PEP 562), so `ernielab unified --help` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ernielab.unified.config": ("PRESETS", "ElasticConfig", "EvalSettings", "UnifiedConfig", "VQConfig"),
    "ernielab.unified.generate": ("caption_codes", "generate_image_codes", "text_nll"),
    "ernielab.unified.io": ("load_model", "load_vq", "save_model", "save_vq"),
    "ernielab.unified.model": ("IMAGE", "IMAGE_START", "TEXT", "KVCache", "SubModel", "UnifiedTransformer",
                               "parameter_counts", "unified_loss"),
    "ernielab.unified.sequences": ("collate", "image_to_text_sequence", "model_inputs", "text_sequence",
                                   "text_to_image_sequence"),
    "ernielab.unified.submodel": ("describe_submodel", "evenly_spaced_layers", "extract_submodel", "sample_submodel"),
    "ernielab.unified.tokenizer": ("TextTokenizer", "build_text_vocab"),
    "ernielab.unified.train": ("UnifiedTask", "UnifiedTrainConfig", "VQTask", "VQTrainConfig", "train_unified",
                               "train_vq"),
    "ernielab.unified.vq": ("VQTokenizer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'ernielab.unified' has no attribute {name!r}")
