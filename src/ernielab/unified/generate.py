"""Decoding with a KV cache: images one row (group) per step, or one scale per step for models with
image_order "scales"; captions one token per step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ernielab.unified.model import IGNORE, IMAGE, KVCache, SubModel, UnifiedTransformer, scale_block_sides
from ernielab.unified.sequences import (
    SequenceBuilder,
    collate,
    model_inputs,
    parent_cells,
    scale_block_offsets,
    text_sequence,
)
from ernielab.unified.tokenizer import BOS, EOS
from ernielab.unified.vq import pack_scales


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits [..., V] -> ids [...]; temperature 0 = greedy; top_k > 0 keeps the k likeliest."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def _next_group(cache: KVCache) -> torch.Tensor:
    return cache.group.max(1, keepdim=True).values + 1


@torch.no_grad()
def generate_image_codes(model: UnifiedTransformer, prompts: list[list[int]], sub: SubModel | None = None,
                         guidance: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Caption token ids (with BOS/EOS) -> image codes [B, g, g] and the number of forward steps (= g).
    A model with image_order "scales" gives multi-scale codes [B, n_scales, g, g] in n_scales steps.

    With guidance != 1 every prompt is paired with the empty caption and the image logits are
    extrapolated away from it (classifier-free guidance; the model is trained with caption dropout).
    """
    if model.config.image_order == "scales":
        return _generate_scales(model, prompts, sub, guidance, temperature, top_k, generator)
    g = model.config.image_grid
    guided = guidance != 1.0
    texts = prompts + ([[BOS, EOS]] * len(prompts) if guided else [])
    seqs = [SequenceBuilder(g).add_text(ids, train=False).add_image(None, rows_in=0, train=False) for ids in texts]
    batch = model_inputs(collate(seqs, pad_left=True))
    cache = KVCache()
    h = model(**batch, sub=sub, cache=cache)[:, -g:]
    rows, steps, n = [], 1, len(prompts)
    cells = torch.arange(g)
    for r in range(g):
        logits = model.image_logits(h).float()
        if guided:
            logits = logits[n:] + guidance * (logits[:n] - logits[n:])
        row = sample(logits, temperature, top_k, generator)  # [B, g]: the whole row at once
        rows.append(row)
        if r == g - 1:
            break
        tokens = row.repeat(2, 1) if guided else row
        step = {"tokens": tokens, "modality": torch.full_like(tokens, IMAGE),
                "cell": (g + r * g + cells).expand_as(tokens), "group": _next_group(cache).expand_as(tokens),
                "valid": torch.ones_like(tokens, dtype=torch.bool)}
        h = model(**step, sub=sub, cache=cache)
        steps += 1
    return torch.stack(rows, 1), steps


def _generate_scales(model: UnifiedTransformer, prompts: list[list[int]], sub: SubModel | None, guidance: float,
                     temperature: float, top_k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Next-scale decoding: each step predicts a whole scale from the prompt and every coarser scale."""
    scales, g = model.config.image_scales, model.config.image_grid
    guided = guidance != 1.0
    texts = prompts + ([[BOS, EOS]] * len(prompts) if guided else [])
    seqs = [SequenceBuilder(g, scales).add_text(ids, train=False).add_image(None, rows_in=0, train=False)
            for ids in texts]
    cache = KVCache()
    h = model(**model_inputs(collate(seqs, pad_left=True)), sub=sub, cache=cache)[:, -scales[0] ** 2:]
    per_scale, n = [], len(prompts)
    for k, (side, offset) in enumerate(zip(scale_block_sides(scales), scale_block_offsets(scales))):
        logits = model.image_logits(h).float()
        if guided:
            logits = logits[n:] + guidance * (logits[:n] - logits[n:])
        codes = sample(logits, temperature, top_k, generator)  # [B, side^2]: the whole scale at once
        per_scale.append(codes.view(n, side, side))
        if k == len(scales) - 1:
            break
        finer, finer_offset = scales[k + 1], offset + side * side
        tokens = codes[:, parent_cells(finer, side)]
        tokens = tokens.repeat(2, 1) if guided else tokens
        step = {"tokens": tokens, "modality": torch.full_like(tokens, IMAGE),
                "cell": (finer_offset + torch.arange(finer * finer)).expand_as(tokens),
                "group": _next_group(cache).expand_as(tokens), "valid": torch.ones_like(tokens, dtype=torch.bool)}
        h = model(**step, sub=sub, cache=cache)
    return pack_scales(per_scale, g), len(scales)


def image_blocks(model: UnifiedTransformer) -> tuple[SequenceBuilder, int]:
    """An empty builder of the model's image layout and the number of code blocks of a whole image."""
    cfg = model.config
    if cfg.image_order == "scales":
        return SequenceBuilder(cfg.image_grid, cfg.image_scales), len(cfg.image_scales)
    return SequenceBuilder(cfg.image_grid), cfg.image_grid


@torch.no_grad()
def caption_codes(model: UnifiedTransformer, codes: torch.Tensor, max_len: int | None = None,
                  sub: SubModel | None = None) -> tuple[list[list[int]], int]:
    """Greedy captions (token ids without BOS, up to EOS) of image codes [B, g, g] (multi-scale: [B, n_scales,
    g, g]); also the steps taken."""
    max_len = max_len or model.config.max_text_len
    seqs = []
    for c in codes:
        builder, blocks = image_blocks(model)
        seqs.append(builder.add_image(c, rows_in=blocks, train=False).add_text([BOS], train=False))
    cache = KVCache()
    h = model(**model_inputs(collate(seqs)), sub=sub, cache=cache)[:, -1]
    out = torch.empty(len(seqs), 0, dtype=torch.long)
    done = torch.zeros(len(seqs), dtype=torch.bool)
    steps = 1
    for _ in range(max_len - 1):
        token = model.text_logits(h).argmax(-1).masked_fill(done, EOS)
        out = torch.cat([out, token[:, None]], 1)
        done |= token == EOS
        if done.all() or out.shape[1] == max_len - 1:
            break
        step = {"tokens": token[:, None], "modality": torch.zeros_like(token[:, None]),
                "cell": torch.full_like(token[:, None], -1), "group": _next_group(cache),
                "valid": torch.ones_like(token[:, None], dtype=torch.bool)}
        h = model(**step, sub=sub, cache=cache)[:, -1]
        steps += 1
    return [_until_eos(row) for row in out.tolist()], steps


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


@torch.no_grad()
def text_nll(model: UnifiedTransformer, texts: list[list[int]], sub: SubModel | None = None,
             batch_size: int = 256) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of text-only sequences and the number of predicted tokens."""
    g = model.config.image_grid
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = collate([text_sequence(ids, g) for ids in texts[start: start + batch_size]])
        h = model(**model_inputs(batch), sub=sub)
        sel = batch["text_target"] != IGNORE
        logits = model.text_logits(h[sel]).float()
        total += F.cross_entropy(logits, batch["text_target"][sel], reduction="sum").item()
        count += int(sel.sum())
    return total, count
