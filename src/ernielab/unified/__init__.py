"""ERNIE 5.0-style unified autoregressive model: text + VQ image tokens, one MoE trunk, elastic sub-models."""
from ernielab.unified.config import PRESETS, UnifiedConfig, VQConfig
from ernielab.unified.generate import caption_codes, generate_image_codes, text_nll
from ernielab.unified.io import load_model, load_vq, save_model, save_vq
from ernielab.unified.model import (
    IMAGE,
    IMAGE_START,
    TEXT,
    KVCache,
    SubModel,
    UnifiedTransformer,
    parameter_counts,
    unified_loss,
)
from ernielab.unified.sequences import (
    collate,
    image_to_text_sequence,
    model_inputs,
    text_sequence,
    text_to_image_sequence,
)
from ernielab.unified.submodel import describe_submodel, evenly_spaced_layers, extract_submodel, sample_submodel
from ernielab.unified.tokenizer import TextTokenizer, build_text_vocab
from ernielab.unified.vq import VQTokenizer

__all__ = [
    "IMAGE", "IMAGE_START", "PRESETS", "TEXT", "KVCache", "SubModel", "TextTokenizer", "UnifiedConfig",
    "UnifiedTransformer", "VQConfig", "VQTokenizer", "build_text_vocab", "caption_codes", "collate",
    "describe_submodel", "evenly_spaced_layers", "extract_submodel", "generate_image_codes",
    "image_to_text_sequence", "load_model", "load_vq", "model_inputs", "parameter_counts", "sample_submodel",
    "save_model", "save_vq", "text_nll", "text_sequence", "text_to_image_sequence", "unified_loss",
]
