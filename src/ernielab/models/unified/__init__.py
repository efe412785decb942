"""ERNIE 5.0-style unified autoregressive model: text + VQ image tokens, one MoE trunk, elastic sub-models."""
from .config import PRESETS, UnifiedConfig, VQConfig
from .generate import caption_codes, generate_image_codes, text_nll
from .io import load_model, load_vq, save_model, save_vq
from .model import IMAGE, IMAGE_START, TEXT, KVCache, SubModel, UnifiedTransformer, parameter_counts, unified_loss
from .sequences import collate, image_to_text_sequence, model_inputs, text_sequence, text_to_image_sequence
from .submodel import describe_submodel, evenly_spaced_layers, extract_submodel, sample_submodel
from .tokenizer import TextTokenizer, build_text_vocab
from .vq import VQTokenizer

__all__ = [
    "IMAGE", "IMAGE_START", "PRESETS", "TEXT", "KVCache", "SubModel", "TextTokenizer", "UnifiedConfig",
    "UnifiedTransformer", "VQConfig", "VQTokenizer", "build_text_vocab", "caption_codes", "collate",
    "describe_submodel", "evenly_spaced_layers", "extract_submodel", "generate_image_codes",
    "image_to_text_sequence", "load_model", "load_vq", "model_inputs", "parameter_counts", "sample_submodel",
    "save_model", "save_vq", "text_nll", "text_sequence", "text_to_image_sequence", "unified_loss",
]
