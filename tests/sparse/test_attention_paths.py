"""Attention paths: the no-mask / boolean-mask dense path and HST as a FlexAttention BlockMask."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from ernielab.core.layers.norms import RMSNorm
from ernielab.sparse.attention import (
    SparseSelfAttention,
    hst_broadcast_block_mask,
    hst_gather_block_mask,
    masked_attention,
    window_block_index,
)


def additive_reference(q, k, v, key_valid):
    """The former dense path: an additive float mask with the most negative finite bias."""
    bias = torch.zeros(key_valid.shape, dtype=q.dtype).masked_fill(~key_valid, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class RecordSDPA:
    """Wraps F.scaled_dot_product_attention and records the attn_mask each call received."""

    def __init__(self, monkeypatch):
        self.masks, self.orig = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, *args, **kwargs):
        self.masks.append(kwargs.get("attn_mask"))
        return self.orig(*args, **kwargs)


def test_dense_path_without_padding_passes_no_mask(monkeypatch):
    torch.manual_seed(0)
    attn = SparseSelfAttention(16, 2, block_size=4)
    x = torch.randn(2, 12, 16)
    valid = torch.ones(2, 12, dtype=torch.bool)
    rec = RecordSDPA(monkeypatch)
    out = attn.dense(x, valid)
    assert rec.masks == [None]
    q, k, v = attn.qkv(x)
    ref = attn.merge(additive_reference(q, k, v, valid[:, None, None, :]))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_dense_path_with_padding_passes_a_bool_mask(monkeypatch):
    torch.manual_seed(0)
    attn = SparseSelfAttention(16, 2, block_size=4)
    x = torch.randn(2, 12, 16)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False
    rec = RecordSDPA(monkeypatch)
    out = attn.dense(x, valid)
    assert len(rec.masks) == 1 and rec.masks[0].dtype == torch.bool
    q, k, v = attn.qkv(x)
    ref = attn.merge(additive_reference(q, k, v, valid[:, None, None, :]))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_fully_masked_queries_stay_finite():
    """A query with no valid key still gets the finite-bias fallback (no NaNs)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2, 3, 8) for _ in range(3))
    key_valid = torch.tensor([[True, True, False], [False, False, False]])[None, None, :, None, :]
    out = masked_attention(q, k, v, key_valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], additive_reference(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                                 key_valid[:, :, 0]), atol=1e-6, rtol=0)


def hst_pattern(valid, g, block_size, window, seg_len):
    """Dense [B, n, n+g] (tokens) and [B, g, n+g] (reps) bool pictures of HST, keys = [seq; reps]."""
    batch, n = valid.shape
    nb = n // block_size
    key_valid = torch.cat([valid, valid.new_ones(batch, g)], dim=1)
    tokens = torch.zeros(n, n + g, dtype=torch.bool)
    for i, row in enumerate(window_block_index(nb, window).tolist()):
        for j in row:
            if 0 <= j < nb:
                tokens[i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size] = True
    tokens[:, n:] = True
    reps = torch.zeros(g, n + g, dtype=torch.bool)
    for j in range(g):
        reps[j, j * seg_len:min(n, (j + 1) * seg_len)] = True
    reps[:, n:] = True
    return tokens[None] & key_valid[:, None], reps[None] & key_valid[:, None]


def block_mask_dense(block_mask, batch, q_len, kv_len):
    """Dense bool picture of a BlockMask: its block table expanded, ANDed with its mask_mod."""
    b = torch.arange(batch)[:, None, None]
    qi, ki = torch.arange(q_len)[None, :, None], torch.arange(kv_len)[None, None, :]
    mask_mod = block_mask.mask_mod(b, torch.zeros_like(b), qi, ki)
    qb, kb = block_mask.BLOCK_SIZE
    listed = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    nums, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    for bi in range(batch):
        bb = min(bi, nums.shape[0] - 1)
        for i in range(nums.shape[2]):
            for j in idx[bb, 0, i, : int(nums[bb, 0, i])].tolist():
                listed[bi, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb] = True
    if block_mask.full_kv_num_blocks is not None:
        fn, fi = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
        for bi in range(batch):
            bb = min(bi, fn.shape[0] - 1)
            for i in range(fn.shape[2]):
                for j in fi[bb, 0, i, : int(fn[bb, 0, i])].tolist():
                    listed[bi, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb] = True
                    mask_mod[bi, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb] = True
    return listed & mask_mod


@pytest.mark.parametrize("window", [0, 1])
def test_hst_block_masks_match_the_pattern(window):
    block, nb, g = 4, 6, 3
    n = block * nb
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 15:] = False
    seg_len = 8
    tokens, reps = hst_pattern(valid, g, block, window, seg_len)
    broadcast = hst_broadcast_block_mask(valid, g, block, window)
    assert torch.equal(block_mask_dense(broadcast, 2, n, n + g), tokens)
    for coarse in (2 * block, 3 * block, 5 * block):  # coarser BlockMask granularity (as for the CUDA kernel's tiles)
        coarse_mask = hst_broadcast_block_mask(valid, g, block, window, sparse_block=coarse)
        assert torch.equal(block_mask_dense(coarse_mask, 2, n, n + g), tokens)
    gather = hst_gather_block_mask(valid, g, block, seg_len)
    assert torch.equal(block_mask_dense(gather, 2, g, n + g), reps)
    # the broadcast table lists only window blocks and the rep block: sparse, not all nb + 1 blocks
    assert int(broadcast.kv_num_blocks.max()) == min(nb, 2 * window + 1) + 1


@pytest.mark.parametrize("padded", [False, True])
def test_flex_hst_equals_sdpa_hst(padded):
    """attention_impl="flex" (eager FlexAttention on the CPU) gives HST's outputs (forward only:
    this torch build has no FlexAttention backward on the CPU)."""
    torch.manual_seed(0)
    dim, g, block, nb = 16, 3, 4, 6
    n = block * nb
    kwargs = dict(window=1, max_blocks=nb, seed=0)
    ref = SparseSelfAttention(dim, 2, block, **kwargs)
    flex = SparseSelfAttention(dim, 2, block, attention_impl="flex", **kwargs)
    flex.load_state_dict(ref.state_dict())
    norm = RMSNorm(dim)
    reps, seq = torch.randn(2, g, dim), torch.randn(2, n, dim)
    valid = torch.ones(2, n, dtype=torch.bool)
    if padded:
        valid[1, 13:] = False
    outs = []
    for attn in (ref, flex):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is not the compiled kernel
            outs.append(attn.hierarchical(reps, seq, valid, norm))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_impl_is_checked():
    with pytest.raises(ValueError, match="attention_impl"):
        SparseSelfAttention(16, 2, 4, attention_impl="triton")
