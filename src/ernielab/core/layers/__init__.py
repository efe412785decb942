"""Layers shared by every model family: attention, RoPE, norms, MLPs, embeddings."""
from ernielab.core.layers.attention import SelfAttention, key_padding_mask
from ernielab.core.layers.embeddings import TimestepEmbedding, sinusoidal_embedding
from ernielab.core.layers.mlp import MLP, GeGLU
from ernielab.core.layers.norms import RMSNorm, modulate
from ernielab.core.layers.rope import apply_rope, rope_angles, rope_cos_sin

__all__ = [
    "GeGLU", "MLP", "RMSNorm", "SelfAttention", "TimestepEmbedding",
    "apply_rope", "key_padding_mask", "modulate", "rope_angles", "rope_cos_sin", "sinusoidal_embedding",
]
