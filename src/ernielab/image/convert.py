"""Key mapping between diffusers' ErnieImageTransformer2DModel and ernielab's ErnieImageTransformer."""
from __future__ import annotations

import re

import torch

# (diffusers pattern, ernielab pattern); the few places where the names differ.
_RULES = [
    (r"^x_embedder\.proj\.", "patch_embed."),
    (r"^adaLN_modulation\.1\.", "adaln."),
    (r"^final_norm\.linear\.", "final_modulation."),
    (r"^final_linear\.", "proj_out."),
    (r"\.adaLN_sa_ln\.", ".attn_norm."),
    (r"\.adaLN_mlp_ln\.", ".mlp_norm."),
    (r"\.self_attention\.to_out\.0\.", ".attn.to_out."),
    (r"\.self_attention\.", ".attn."),
    (r"\.mlp\.linear_fc2\.", ".mlp.down_proj."),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def from_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(k, _RULES): v for k, v in state.items()}


def _inverse_rules():
    # Applied in reverse order so ".attn.to_out." is handled before the generic ".attn." rule.
    inverse = []
    for pattern, repl in reversed(_RULES):
        src = "^" + re.escape(repl) if pattern.startswith("^") else re.escape(repl)
        dst = pattern.lstrip("^").replace("\\.", ".")
        inverse.append((src, dst))
    inverse.sort(key=lambda r: "to_out" not in r[0])
    return inverse


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rules = _inverse_rules()
    out = {}
    for k, v in state.items():
        for src, dst in rules:
            new = re.sub(src, dst, k)
            if new != k:
                k = new
                break
        out[k] = v
    return out
