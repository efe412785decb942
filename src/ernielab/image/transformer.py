"""ERNIE-Image single-stream diffusion transformer.

Image tokens come first, projected text tokens after them, in one sequence. One adaLN modulation
(shift/scale/gate for attention and MLP), computed once from the timestep, is shared by every block.
Blocks are pre-RMSNorm with per-head QK RMSNorm, 3-axis RoPE and a bias-free GeGLU MLP.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ernielab.core.layers.attention import SelfAttention
from ernielab.core.layers.embeddings import TimestepEmbedding
from ernielab.core.layers.mlp import GeGLU
from ernielab.core.layers.norms import RMSNorm, modulate
from ernielab.core.layers.rope import rope_angles, rope_cos_sin
from ernielab.core.persistence import CONFIG_NAME, load_checked, save_model_folder
from ernielab.image.config import ErnieImageConfig
from ernielab.image.convert import from_diffusers_state_dict, to_diffusers_state_dict


class _ShapeOnly(nn.Module):
    """Stands in for a model in `load_checked`: the same state-dict keys and shapes, loading nothing."""

    def __init__(self, shapes: dict[str, torch.Tensor]):
        super().__init__()
        self._shapes = shapes

    def state_dict(self, *args, **kwargs):
        return self._shapes

    def load_state_dict(self, *args, **kwargs):
        return None


class SharedAdaLNBlock(nn.Module):
    def __init__(self, cfg: ErnieImageConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.eps)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, qk_norm=cfg.qk_layernorm, eps=cfg.eps)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.eps)
        self.mlp = GeGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x, mod, rope, mask, attn_bias=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
        h = self.attn(modulate(self.attn_norm(x), shift_a, scale_a), rope=rope, mask=mask, attn_bias=attn_bias)
        x = x + (gate_a.float() * h.float()).to(x.dtype)
        h = self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))
        return x + (gate_m.float() * h.float()).to(x.dtype)


class ErnieImageTransformer(nn.Module):
    def __init__(self, config: ErnieImageConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_proj = nn.Linear(cfg.text_in_dim, d, bias=False) if cfg.text_in_dim != d else None
        self.time_embedding = TimestepEmbedding(d)
        self.adaln = nn.Linear(d, 6 * d)
        self.layers = nn.ModuleList(SharedAdaLNBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False
        # Zero-init the modulation and output so training starts from an identity residual stack.
        for layer in (self.adaln, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- positions and masks -------------------------------------------------------------------
    @staticmethod
    def position_ids(batch: int, grid_h: int, grid_w: int, text_len: int, text_lens: torch.Tensor) -> torch.Tensor:
        """[B, N_img + T, 3]: image token (y, x) -> (text_len_b, y, x); text token j -> (j, 0, 0)."""
        device = text_lens.device
        ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
        grid = torch.stack([ys, xs], -1).reshape(1, -1, 2).float().expand(batch, -1, -1)
        img = torch.cat([text_lens.float().view(batch, 1, 1).expand(-1, grid.shape[1], 1), grid], -1)
        txt = torch.zeros(batch, text_len, 3, device=device)
        txt[..., 0] = torch.arange(text_len, device=device).float()
        return torch.cat([img, txt], dim=1)

    @staticmethod
    def key_mask(n_img: int, text_len: int, text_lens: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, 1, S] bool: image tokens always attendable, text tokens only up to each prompt's length.

        None when nothing is padded, which lets attention take its faster unmasked path. That check reads a value
        off the tensor, a graph break under torch.compile; compiled, the mask is always built (all-True when
        nothing is padded), so eager numbers stay as they were and the compiled graph is whole."""
        if not torch.compiler.is_compiling() and bool((text_lens >= text_len).all()):
            return None
        valid_text = torch.arange(text_len, device=text_lens.device)[None] < text_lens[:, None]
        valid_img = torch.ones(len(text_lens), n_img, dtype=torch.bool, device=text_lens.device)
        return torch.cat([valid_img, valid_text], 1)[:, None, None, :]

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_lens: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        return_hidden_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the flow velocity.

        x: latents [B, C, H, W]; timestep: [B] on the 0..1000 scale (sigma * 1000);
        text: [B, T, text_in_dim] right-padded; text_lens: [B] valid lengths (all T if None);
        attn_bias: optional additive attention logits broadcastable to [B, heads, S, S], S = N_img + T
        (training-time knowledge enhancement uses it);
        return_hidden_at: also return the image tokens' hidden states [B, N_img, hidden] after that many
        blocks (a discriminator head on the fake-score net reads them during distillation).
        """
        cfg = self.config
        B, C, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels:
            raise ValueError(f"latents have {C} channels, model expects {cfg.in_channels}")
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by patch size {p}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[-1] != cfg.text_in_dim:
            raise ValueError(f"text must be [B={B}, T, {cfg.text_in_dim}], got {tuple(text.shape)}")
        gh, gw, T = H // p, W // p, text.shape[1]
        if text_lens is None:
            text_lens = torch.full((B,), T, device=x.device, dtype=torch.long)

        img = self.patch_embed(x).flatten(2).transpose(1, 2)
        txt = self.text_proj(text) if self.text_proj is not None else text
        h = torch.cat([img, txt.to(img.dtype)], dim=1)

        rope = rope_cos_sin(rope_angles(self.position_ids(B, gh, gw, T, text_lens), cfg.rope_axes_dim, cfg.rope_theta))
        mask = self.key_mask(gh * gw, T, text_lens)
        c = self.time_embedding(timestep, dtype=h.dtype)
        mod = [m[:, None] for m in self.adaln(F.silu(c)).chunk(6, dim=-1)]

        if return_hidden_at is not None and not 0 <= return_hidden_at <= cfg.num_layers:
            raise ValueError(f"return_hidden_at must lie in 0..{cfg.num_layers}, got {return_hidden_at}")
        hidden = h[:, : gh * gw] if return_hidden_at == 0 else None
        for depth, layer in enumerate(self.layers, start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, mod, rope, mask, attn_bias, use_reentrant=False)
            else:
                h = layer(h, mod, rope, mask, attn_bias)
            if depth == return_hidden_at:
                hidden = h[:, : gh * gw]

        scale, shift = self.final_modulation(c).chunk(2, dim=-1)
        h = self.final_norm(h) * (1 + scale[:, None]) + shift[:, None]
        out = self.proj_out(h[:, : gh * gw])
        # token (y, x) holds a p x p x C patch; lay it back out as [B, C, H, W]
        out = out.view(B, gh, gw, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(B, cfg.out_channels, H, W)
        return out if return_hidden_at is None else (out, hidden)

    # ---- persistence ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model_folder(self, self.config, path, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "ErnieImageTransformer":
        """Load an ernielab folder, or a diffusers `ErnieImageTransformer2DModel` folder (converted on the fly)."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a transformer checkpoint folder")
        raw = json.loads((path / CONFIG_NAME).read_text())
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"no .safetensors weights in {path}")
        state = {}
        for file in weights:
            state.update(load_file(str(file)))
        if "_class_name" in raw:  # a diffusers folder
            return cls.from_diffusers(raw, state, dtype, copy=False)  # `state` is ours alone: no copy
        model = cls(ErnieImageConfig.from_dict(raw))
        model.load_state_dict_checked(state)
        return model.to(dtype)

    @classmethod
    def from_diffusers(cls, config: dict | object, state_dict: dict | None = None, dtype=torch.float32, *,
                       copy: bool = True):
        """Build from a diffusers config dict (or a live diffusers model) and its state dict. `copy=False` lets the
        model take the given tensors themselves (when nothing else holds them)."""
        if hasattr(config, "state_dict") and hasattr(config, "config"):
            state_dict = config.state_dict() if state_dict is None else state_dict
            config = dict(config.config)
        config = dict(config)
        known = {f.name for f in dataclasses.fields(ErnieImageConfig)}
        extra = sorted(k for k in config if not k.startswith("_") and k not in known)
        if extra:  # as diffusers does with config keys its class does not take: ignored, with a warning
            warnings.warn(f"ignoring config keys ErnieImageTransformer2DModel does not take: {extra}", stacklevel=2)
        cfg = ErnieImageConfig.from_diffusers({k: v for k, v in config.items() if k not in extra})
        # Built on the meta device and filled with the checkpoint's tensors: the release's 8B transformer is
        # neither randomly initialised nor held in float32 first (the values are those a copy would give).
        with torch.device("meta"):
            model = cls(cfg)
        state = from_diffusers_state_dict(state_dict)
        load_checked(_ShapeOnly(model.state_dict()), state, "ErnieImageTransformer")  # one readable error on a misfit
        model.load_state_dict({k: v.to(dtype=dtype, copy=copy) for k, v in state.items()}, assign=True)
        return model

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        return to_diffusers_state_dict(self.state_dict())

    def load_state_dict_checked(self, state: dict[str, torch.Tensor]) -> None:
        load_checked(self, state, "ErnieImageTransformer")
