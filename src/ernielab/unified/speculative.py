"""Self-speculative caption decoding with the MTP heads: the same captions as greedy decoding, in fewer forwards.

After the last committed text token, the main head gives greedy's next token x1 (certain) and MTP head d drafts
the token d further on. One forward over [x1, draft_1 .. draft_k] (KV cache) then yields greedy's choice after
every one of them; draft d is accepted while it equals that choice (greedy acceptance), so a forward commits
x1 plus the accepted drafts, and its hidden state after the last accepted token gives the next round's x1 and
drafts for free. Mathematically the output is greedy decoding's, token for token; in floating point a chunk of
k+1 queries may round differently from k+1 one-token steps, which could flip an argmax tie (tested equal).

Rejected drafts stay in the KV cache as invalid positions (masked from attention, RoPE positions rewound),
except the rejected tail common to the whole batch, which is cut off; at batch 1 the cache is exactly greedy's.
"""
from __future__ import annotations

import dataclasses

import torch

from ernielab.unified.generate import image_blocks
from ernielab.unified.model import TEXT, KVCache, SubModel, UnifiedTransformer
from ernielab.unified.sequences import collate, model_inputs
from ernielab.unified.tokenizer import BOS, EOS


@dataclasses.dataclass
class SpeculativeStats:
    """Bookkeeping of one decode. A draft counts as checked when its sequence was unfinished in that round."""

    draft_heads: int
    forwards: int = 0  # model calls, the prefix included
    drafted: int = 0  # drafts checked
    accepted: int = 0  # drafts committed (equal to greedy's choice, up to EOS and the length limit)
    tokens: int = 0  # committed tokens, EOS included (what greedy decoding takes one forward each for)
    accepted_at: list[int] = dataclasses.field(default_factory=list)  # [d-1]: rounds whose drafts 1..d all held

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"draft_heads": self.draft_heads, "forwards": self.forwards, "drafted": self.drafted,
                "accepted": self.accepted, "tokens": self.tokens, "acceptance_rate": self.acceptance_rate,
                "accepted_at": list(self.accepted_at)}


def _drafts(model: UnifiedTransformer, h: torch.Tensor, heads: int) -> torch.Tensor:
    """Greedy next token and the MTP heads' drafts after hidden states h [B, D] -> [B, 1 + heads]."""
    tokens = [model.text_logits(h).argmax(-1)]
    tokens += [model.mtp_logits(h, depth).argmax(-1) for depth in range(1, heads + 1)]
    return torch.stack(tokens, 1)


def _reject(cache: KVCache, kept: torch.Tensor, width: int) -> None:
    """Undo the rejected positions of the last `width`-token chunk, of which the first `kept` [B] tokens stand:
    the rejected tail common to the batch is cut from the cache, the rest masked; RoPE goes on after the kept."""
    start = cache.next_position - width
    cut = int((width - kept).min())
    if cut:
        for layer in cache.keys:
            cache.keys[layer] = cache.keys[layer][:, :, :-cut]
            cache.values[layer] = cache.values[layer][:, :, :-cut]
        cache.group, cache.valid = cache.group[:, :-cut], cache.valid[:, :-cut]
    column = torch.arange(width - cut, device=kept.device)
    past = cache.valid.shape[1] - (width - cut)
    cache.valid = torch.cat([cache.valid[:, :past], cache.valid[:, past:] & (column < kept[:, None])], 1)
    cache.next_position = start + kept


@torch.no_grad()
def speculative_caption_codes(model: UnifiedTransformer, codes: torch.Tensor, max_len: int | None = None,
                              sub: SubModel | None = None,
                              draft_heads: int | None = None) -> tuple[list[list[int]], SpeculativeStats]:
    """Greedy captions of image codes [B, g, g] or [B, n_scales, g, g] (token ids without BOS, up to EOS), as `generate.caption_codes`
    gives them, drafted by `draft_heads` MTP heads (default: all) and verified in one forward per round."""
    heads = len(model.mtp) if draft_heads is None else draft_heads
    if not 0 <= heads <= len(model.mtp):
        raise ValueError(f"draft_heads must be in [0, {len(model.mtp)}] (the model's MTP heads), got {heads}")
    limit = (max_len or model.config.max_text_len) - 1  # tokens after BOS, as greedy decoding caps them
    seqs = []
    for c in codes:  # the model's image layout (rows or scales), as greedy decoding builds it
        builder, blocks = image_blocks(model)
        seqs.append(builder.add_image(c, rows_in=blocks, train=False).add_text([BOS], train=False))
    cache = KVCache()
    h = model(**model_inputs(collate(seqs)), sub=sub, cache=cache)[:, -1]
    stats = SpeculativeStats(draft_heads=heads, forwards=1, accepted_at=[0] * heads)
    out: list[list[int]] = [[] for _ in seqs]
    done = [limit < 1] * len(seqs)  # greedy decoding takes no token then either
    while not all(done):
        chunk = _drafts(model, h, heads)  # [B, 1 + heads]: greedy's next token, then the drafts
        for b, row in enumerate(chunk[:, 0].tolist()):
            if not done[b]:
                done[b] = _commit(out[b], row, limit)
        if all(done):
            break
        hs = _verify(model, cache, chunk, sub)
        stats.forwards += 1
        greedy = model.text_logits(hs[:, :heads]).argmax(-1)  # greedy's token after chunk[:, :heads]
        held = (greedy == chunk[:, 1:]).long().cumprod(1).sum(1)  # drafts accepted per sequence
        kept = torch.full_like(held, heads + 1)
        for b in range(len(seqs)):
            if done[b]:
                continue
            stats.drafted += heads
            n = 0
            while n < int(held[b]) and not done[b]:
                done[b] = _commit(out[b], int(chunk[b, 1 + n]), limit)
                n += 1
            stats.accepted += n
            for d in range(n):
                stats.accepted_at[d] += 1
            kept[b] = n + 1
        _reject(cache, kept, heads + 1)
        h = hs[torch.arange(len(seqs)), kept - 1]
    stats.tokens = sum(len(row) for row in out)
    return [row[: row.index(EOS)] if EOS in row else row for row in out], stats


def _commit(row: list[int], token: int, limit: int) -> bool:
    """Append a token to a caption; -> whether the caption is finished (EOS or the length limit)."""
    row.append(token)
    return token == EOS or len(row) >= limit


def _verify(model: UnifiedTransformer, cache: KVCache, chunk: torch.Tensor, sub: SubModel | None) -> torch.Tensor:
    """Run a chunk of text tokens [B, W] after the cache, one causal group each -> hidden states [B, W, D]."""
    width = chunk.shape[1]
    # Each token's group follows the last *kept* one (rejected tokens stay in the cache, masked): groups are
    # text positions in the "scales" layout's rotary axes, so they must run on exactly as greedy decoding's.
    last_kept = cache.group.masked_fill(~cache.valid, -1).max(1, keepdim=True).values
    group = last_kept + 1 + torch.arange(width, device=chunk.device)
    step = {"tokens": chunk, "modality": torch.full_like(chunk, TEXT), "cell": torch.full_like(chunk, -1),
            "group": group, "valid": torch.ones_like(chunk, dtype=torch.bool)}
    return model(**step, sub=sub, cache=cache)
