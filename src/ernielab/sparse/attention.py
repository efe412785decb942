"""Block-sparse self-attention: local block windows, global / representative tokens, BigBird random blocks.

Sparse paths cut the sequence into blocks of `block_size` tokens and gather, for every query block, only
the key blocks it may see into a [num_blocks, keys_per_block] layout. Scores then cost
O(n * keys_per_block) time and memory: no [n, n] tensor is ever built. The dense paths (full attention)
run the same projections, so one set of weights can be evaluated under either topology.

Topologies (n sequence tokens, g prefix tokens, b = block_size, w = window):
- local:  query block i sees key blocks i-w .. i+w.
- bigbird: local + `num_random_blocks` random key blocks per query block + g global tokens that see
  everything and are seen by everything.
- hst (hierarchical): g representative tokens first gather their own segment of consecutive blocks
  (plus each other); then every token attends, in one softmax, to its local window and the freshly
  updated representatives. Local and global information therefore flow through one layer stack.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.layers.attention import SelfAttention


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Softmax attention; key_valid is bool (True = attend) broadcastable to the scores [..., Lq, Lk].

    No mask is passed when every key is valid, so SDPA may pick the flash / memory-efficient kernel
    (an explicit mask rules flash out). With padding, a boolean mask is passed while every query sees
    at least one valid key; otherwise masked keys get the most negative finite bias rather than -inf,
    so a query that sees no valid key (a padding query) yields a finite average instead of NaNs that
    would poison the backward pass. The three forms give the same outputs wherever they overlap.
    """
    if bool(key_valid.all()):
        mask = None
    elif bool(key_valid.any(-1).all()):
        mask = key_valid
    else:
        mask = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_valid, torch.finfo(q.dtype).min)
    if q.ndim <= 4:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Fused kernels take [batch, heads, L, D]: fold the block dims into the batch so blocks run through
    # the flash kernel (no stored scores) instead of the unfused path.
    lead = q.shape[:-2]
    if mask is not None:
        mask = mask.expand(*lead, *mask.shape[-2:]).reshape(-1, 1, *mask.shape[-2:])
    out = F.scaled_dot_product_attention(*(t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v)), attn_mask=mask)
    return out.reshape(*lead, *out.shape[-2:])


def window_block_index(num_blocks: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """[num_blocks, 2w+1] key block ids i-w .. i+w per query block i (ids outside the range are masked later)."""
    offsets = torch.arange(-window, window + 1, device=device)
    return torch.arange(num_blocks, device=device)[:, None] + offsets[None]


def random_block_index(
    num_blocks: int, num_random: int, window: int, seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """[num_blocks, num_random] distinct random key blocks outside each query block's window; -1 = none.

    The blocks outside the window of i are i+w+1 .. i+nb-w-1 (mod nb); their range is cut into
    num_random equal strata and one block drawn from each, so picks never repeat (a repeated key would
    be counted twice by the softmax) and the cost stays O(nb * num_random). The generator is seeded by
    (seed, num_blocks): the pattern is fixed for a layer and a layout, with no state to checkpoint.
    """
    if num_random <= 0:
        return torch.empty(num_blocks, 0, dtype=torch.long, device=device)
    outside = max(0, num_blocks - (2 * window + 1))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + num_blocks)
    lo = torch.arange(num_random) * outside // num_random
    hi = (torch.arange(num_random) + 1) * outside // num_random
    offsets = lo + (torch.rand(num_blocks, num_random, generator=gen) * (hi - lo)).long()
    index = (torch.arange(num_blocks)[:, None] + window + 1 + offsets) % max(1, num_blocks)
    return index.masked_fill(hi == lo, -1).to(device)  # empty strata: fewer blocks than requested


def _gather_blocks(x_blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x_blocks [B, H, nb, b, D], index [nb, K] -> [B, H, nb, K*b, D] (ids clamped; the mask drops strays)."""
    return x_blocks[:, :, index.clamp(0, x_blocks.shape[2] - 1)].flatten(3, 4)


def _gather_valid(valid_blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """valid_blocks [B, nb, b], index [nb, K] -> [B, nb, K*b]; ids outside [0, nb) are invalid."""
    num_blocks = valid_blocks.shape[1]
    inside = (index >= 0) & (index < num_blocks)
    gathered = valid_blocks[:, index.clamp(0, num_blocks - 1)] & inside[None, :, :, None]
    return gathered.flatten(2)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    index: torch.Tensor,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query block attends to the key blocks listed in `index` plus every global key.

    q, k, v [B, H, n, D] with n divisible by block_size; valid [B, n] bool; index [n/b, K];
    global_k / global_v [B, H, g, D] (optional), global_valid [B, g]. Returns [B, H, n, D].
    Scores are [B, H, n/b, b, K*b + g]: linear in n for a fixed topology.
    """
    batch, heads, n, dim = q.shape
    if n % block_size:
        raise ValueError(f"sequence length {n} is not a multiple of block size {block_size}")
    num_blocks = n // block_size

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(2, (num_blocks, block_size))

    keys, values = _gather_blocks(blocks(k), index), _gather_blocks(blocks(v), index)
    key_valid = _gather_valid(valid.unflatten(1, (num_blocks, block_size)), index)
    if global_k is not None:
        g = global_k.shape[2]
        expand = (batch, heads, num_blocks, g, dim)
        keys = torch.cat([global_k[:, :, None].expand(expand), keys], dim=3)
        values = torch.cat([global_v[:, :, None].expand(expand), values], dim=3)
        if global_valid is None:
            global_valid = torch.ones(batch, g, dtype=torch.bool, device=q.device)
        key_valid = torch.cat([global_valid[:, None].expand(batch, num_blocks, g), key_valid], dim=2)
    out = masked_attention(blocks(q), keys, values, key_valid[:, None, :, None, :])
    return out.flatten(2, 3)


def segment_attention(
    q_reps: torch.Tensor,
    k_reps: torch.Tensor,
    v_reps: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    segment_len: int,
) -> torch.Tensor:
    """Representative j attends to all g representatives and to tokens [j*L, (j+1)*L) (L = segment_len).

    q/k/v_reps [B, H, g, D], k, v [B, H, n, D] with n <= g*L, valid [B, n]. Returns [B, H, g, D].
    Cost O(g*g + g*L).
    """
    batch, heads, g, dim = q_reps.shape
    n = k.shape[2]
    seg_len = segment_len
    pad = g * seg_len - n
    if pad < 0:
        raise ValueError(f"{g} segments of {seg_len} tokens cannot cover {n} tokens")
    k_seg = F.pad(k, (0, 0, 0, pad)).unflatten(2, (g, seg_len))
    v_seg = F.pad(v, (0, 0, 0, pad)).unflatten(2, (g, seg_len))
    valid_seg = F.pad(valid, (0, pad), value=False).unflatten(1, (g, seg_len))
    expand = (batch, heads, g, g, dim)
    keys = torch.cat([k_reps[:, :, None].expand(expand), k_seg], dim=3)
    values = torch.cat([v_reps[:, :, None].expand(expand), v_seg], dim=3)
    reps_valid = torch.ones(batch, g, g, dtype=torch.bool, device=valid.device)
    key_valid = torch.cat([reps_valid, valid_seg], dim=2)
    out = masked_attention(q_reps[:, :, :, None], keys, values, key_valid[:, None, :, None, :])
    return out.squeeze(3)


ATTENTION_IMPLS = ("sdpa", "flex")
_compiled_flex: Callable | None = None


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """torch's FlexAttention: compiled (the fused block-sparse Triton kernel) on CUDA, eager elsewhere.

    Eager FlexAttention builds the full scores (a reference, for tests on the CPU); only the compiled
    kernel skips the blocks the BlockMask leaves out.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def hst_broadcast_block_mask(
    valid: torch.Tensor, num_reps: int, block_size: int, window: int, sparse_block: int | None = None
):
    """BlockMask of HST's token step: query token t (block t // b) sees the valid tokens of blocks
    t//b - w .. t//b + w and all `num_reps` representatives.

    Keys are laid out [sequence (n); representatives (g)], so sequence blocks line up with the
    BlockMask's blocks. `sparse_block` (default block_size; a multiple of it, e.g. 128 for the CUDA
    kernel's tiles) is the BlockMask's granularity: a coarse block is listed when any of its HST blocks
    is. The table is built from the [n/b, n/b] block adjacency (no n x n mask is evaluated); the
    mask_mod is exact: it drops out-of-window and padded keys inside the listed blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, n = valid.shape
    sparse_block = sparse_block or block_size
    if n % block_size or sparse_block % block_size:
        raise ValueError(f"length {n} and sparse_block {sparse_block} must be multiples of block size {block_size}")
    nb, c, device = n // block_size, sparse_block // block_size, valid.device
    q_blocks, seq_blocks = -(-n // sparse_block), -(-n // sparse_block)
    kv_blocks = -(-(n + num_reps) // sparse_block)
    ids = torch.arange(nb, device=device)
    near = (ids[:, None] - ids[None, :]).abs() <= window  # HST block adjacency (window)
    near = F.pad(near, (0, seq_blocks * c - nb, 0, q_blocks * c - nb))
    adjacency = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool, device=device)
    adjacency[:, :seq_blocks] = near.view(q_blocks, c, seq_blocks, c).any(3).any(1)
    adjacency[:, n // sparse_block:] = True  # blocks holding representative keys
    # listed blocks first (ascending ids), then unused slots; the table's width is the key block count
    table = torch.sort(adjacency.to(torch.int8), dim=1, descending=True, stable=True).indices
    counts = adjacency.sum(1)
    key_valid = torch.cat([valid, valid.new_ones(batch, num_reps)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        close = (q_idx // block_size - kv_idx // block_size).abs() <= window
        return (close | (kv_idx >= n)) & key_valid[b, kv_idx]

    return BlockMask.from_kv_blocks(
        counts[None, None].to(torch.int32), table[None, None].to(torch.int32),
        BLOCK_SIZE=sparse_block, mask_mod=mask_mod, seq_lengths=(n, n + num_reps),
    )


def hst_gather_block_mask(valid: torch.Tensor, num_reps: int, block_size: int, segment_len: int):
    """BlockMask of HST's gather step: representative j sees every representative and the valid tokens
    of its segment [j*L, (j+1)*L). Keys are laid out [sequence (n); representatives (g)]. The g queries
    span few query blocks, so this mask is built by evaluating mask_mod (O(g * n))."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, n = valid.shape
    key_valid = torch.cat([valid, valid.new_ones(batch, num_reps)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx >= n) | (kv_idx // segment_len == q_idx)) & key_valid[b, kv_idx]

    return create_block_mask(mask_mod, batch, None, num_reps, n + num_reps, device=valid.device,
                             BLOCK_SIZE=block_size)


class SparseSelfAttention(SelfAttention):
    """SelfAttention projections (and QK norm) run under dense, BigBird or hierarchical (HST) topologies.

    Inputs are [B, S, D] hidden states and [B, S] bool `valid` masks (True = real token). Sparse
    topologies need the sequence part padded to a multiple of `block_size` (the caller pads and masks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_size: int,
        window: int = 1,
        num_random_blocks: int = 0,
        qk_norm: bool = True,
        dropout: float = 0.0,
        seed: int = 0,
        max_blocks: int = 1,
        attention_impl: str = "sdpa",
    ):
        super().__init__(dim, num_heads, qk_norm=qk_norm)
        if block_size < 1 or window < 0 or num_random_blocks < 0:
            raise ValueError("block_size must be >= 1, window and num_random_blocks >= 0")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        # "sdpa": gathered key blocks through scaled_dot_product_attention (the default);
        # "flex": HST's sparse topology as a FlexAttention BlockMask (same outputs; compiled on CUDA)
        self.attention_impl = attention_impl
        self.block_size = block_size
        self.window = window
        self.num_random_blocks = num_random_blocks
        self.seed = seed
        # Random blocks and HST segments are laid out for max_blocks blocks and cut to the batch, so a
        # sequence's topology does not depend on how far its batch was padded.
        self.max_blocks = max_blocks
        self.drop = nn.Dropout(dropout)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, S, Dh] head outputs -> dropout(to_out(.)) [B, S, D]."""
        return self.drop(self.to_out(out.transpose(1, 2).flatten(2)))

    def block_index(self, num_blocks: int, device: torch.device, random: bool) -> torch.Tensor:
        index = window_block_index(num_blocks, self.window, device)
        if random and self.num_random_blocks:
            layout = max(num_blocks, self.max_blocks)
            rand = random_block_index(layout, self.num_random_blocks, self.window, self.seed, device)[:num_blocks]
            index = torch.cat([index, rand.masked_fill(rand >= num_blocks, -1)], dim=1)
        return index

    def segment_len(self, num_blocks: int, num_reps: int) -> int:
        """Tokens summarised by each representative: the layout's blocks shared evenly, rounded up."""
        return math.ceil(max(num_blocks, self.max_blocks) / num_reps) * self.block_size

    def dense(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Full attention over all of x: the O(n^2) reference topology."""
        q, k, v = self.qkv(x)
        return self.merge(masked_attention(q, k, v, valid[:, None, None, :]))

    def bigbird(self, x: torch.Tensor, valid: torch.Tensor, num_global: int) -> torch.Tensor:
        """x = [globals; sequence]; globals attend to everything, sequence blocks to window + random + globals."""
        q, k, v = self.qkv(x)
        g = num_global
        out_global = masked_attention(q[:, :, :g], k, v, valid[:, None, None, :])
        index = self.block_index((x.shape[1] - g) // self.block_size, x.device, random=True)
        out_seq = block_sparse_attention(
            q[:, :, g:], k[:, :, g:], v[:, :, g:], valid[:, g:], self.block_size, index,
            k[:, :, :g], v[:, :, :g], valid[:, :g],
        )
        return self.merge(torch.cat([out_global, out_seq], dim=2))

    def hierarchical(
        self,
        reps: torch.Tensor,
        seq: torch.Tensor,
        valid: torch.Tensor,
        norm: Callable[[torch.Tensor], torch.Tensor],
        dense: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One HST attention step on the residual streams; returns the updated (reps, seq).

        reps [B, g, D], seq [B, n, D], valid [B, n]; `norm` is the block's pre-norm. Sequential by design:
        the representatives are refreshed (gather) before the tokens read them (broadcast), so a token sees
        a summary of the whole input in the same layer. dense=True gives every query every key
        (reps see all tokens; tokens see all tokens and the refreshed reps) with the same weights.
        """
        qs, ks, vs = self.qkv(norm(seq))
        qr, kr, vr = self.qkv(norm(reps))
        g = reps.shape[1]
        flex = self.attention_impl == "flex" and not dense
        if dense:
            all_valid = torch.cat([valid.new_ones(valid.shape[0], g), valid], dim=1)
            gathered = masked_attention(qr, torch.cat([kr, ks], 2), torch.cat([vr, vs], 2), all_valid[:, None, None])
        elif flex:
            seg_len = self.segment_len(seq.shape[1] // self.block_size, g)
            mask = hst_gather_block_mask(valid, g, self.block_size, seg_len)
            gathered = flex_attention_call(qr, torch.cat([ks, kr], 2), torch.cat([vs, vr], 2), mask)
        else:
            seg_len = self.segment_len(seq.shape[1] // self.block_size, g)
            gathered = segment_attention(qr, kr, vr, ks, vs, valid, seg_len)
        reps = reps + self.merge(gathered)

        _, kr, vr = self.qkv(norm(reps))
        if dense:
            out = masked_attention(qs, torch.cat([kr, ks], 2), torch.cat([vr, vs], 2), all_valid[:, None, None])
        elif flex:
            # the CUDA kernel's tiles are 128 tokens: coarsen the BlockMask to a multiple of 128 there
            sparse = math.lcm(self.block_size, 128) if seq.is_cuda else self.block_size
            mask = hst_broadcast_block_mask(valid, g, self.block_size, self.window, sparse)
            out = flex_attention_call(qs, torch.cat([ks, kr], 2), torch.cat([vs, vr], 2), mask)
        else:
            index = self.block_index(seq.shape[1] // self.block_size, seq.device, random=False)
            out = block_sparse_attention(qs, ks, vs, valid, self.block_size, index, kr, vr)
        return reps, seq + self.merge(out)
