"""Multi-head self-attention with optional per-head QK RMSNorm, RoPE and a boolean key mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.layers.norms import RMSNorm
from ernielab.core.layers.rope import apply_rope


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, S_k] bool (True = attend) -> [B, 1, 1, S_k] mask for scaled_dot_product_attention."""
    return valid[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.norm_q = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor | None = None):
        """Project x [B, S, D] to q, k, v [B, H, S, Dh] with QK norm and RoPE applied."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """mask: bool broadcastable to [B, H, S, S] (True = attend); attn_bias: additive float of the same shape."""
        q, k, v = self.qkv(x, rope)
        attn_mask = mask
        if attn_bias is not None:
            attn_mask = attn_bias if mask is None else attn_bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.to_out(out.transpose(1, 2).flatten(2))
