"""Layers shared by every model family: attention, RoPE, norms, MLPs, embeddings."""
from .attention import SelfAttention, key_padding_mask
from .embeddings import TimestepEmbedding, sinusoidal_embedding
from .mlp import MLP, GeGLU
from .norms import RMSNorm, modulate
from .rope import apply_rope, rope_angles, rope_cos_sin

__all__ = [
    "GeGLU", "MLP", "RMSNorm", "SelfAttention", "TimestepEmbedding",
    "apply_rope", "key_padding_mask", "modulate", "rope_angles", "rope_cos_sin", "sinusoidal_embedding",
]
