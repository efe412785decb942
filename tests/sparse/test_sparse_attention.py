"""Block-sparse attention against masked dense references; linear memory; padding invariance."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ernielab.core.layers.norms import RMSNorm
from ernielab.sparse.attention import (
    SparseSelfAttention,
    block_sparse_attention,
    masked_attention,
    random_block_index,
    window_block_index,
)
from ernielab.sparse.config import SparseClassifierConfig
from ernielab.sparse.model import SparseClassifier


def block_mask(index: torch.Tensor, block_size: int) -> torch.Tensor:
    """[n, n] bool from a [nb, K] key-block table: the dense picture of a block topology."""
    nb = index.shape[0]
    mask = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    for i, row in enumerate(index.tolist()):
        for j in row:
            if 0 <= j < nb:
                mask[i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size] = True
    return mask


def heads_to_hidden(attn, out):
    return attn.to_out(out.transpose(1, 2).flatten(2))


def test_block_sparse_equals_masked_dense():
    torch.manual_seed(0)
    b, nb, g = 4, 6, 3
    n = b * nb
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    gk, gv = torch.randn(2, 2, g, 8), torch.randn(2, 2, g, 8)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 17:] = False
    index = torch.cat([window_block_index(nb, 1), random_block_index(nb, 2, 1, seed=3)], dim=1)
    out = block_sparse_attention(q, k, v, valid, b, index, gk, gv)

    mask = torch.cat([torch.ones(n, g, dtype=torch.bool), block_mask(index, b)], dim=1)[None]
    mask = mask & torch.cat([torch.ones(2, g, dtype=torch.bool), valid], dim=1)[:, None, :]
    ref = masked_attention(q, torch.cat([gk, k], 2), torch.cat([gv, v], 2), mask[:, None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_random_blocks_avoid_the_window_and_are_reproducible():
    idx = random_block_index(10, 3, window=1, seed=5)
    rows = torch.arange(10)[:, None]
    assert idx.shape == (10, 3) and ((idx - rows).abs() > 1).all() and ((idx >= 0) & (idx < 10)).all()
    assert all(len(set(row)) == 3 for row in idx.tolist())  # distinct: a repeat would double-count keys
    assert torch.equal(idx, random_block_index(10, 3, window=1, seed=5))
    assert not torch.equal(idx, random_block_index(10, 3, window=1, seed=6))
    assert (random_block_index(3, 2, window=1, seed=0) == -1).all()  # the window already covers everything
    few = random_block_index(5, 3, window=1, seed=0)  # only 2 blocks lie outside each window
    assert ((few == -1).sum(1) == 1).all()


def test_bigbird_layer_equals_masked_dense():
    torch.manual_seed(1)
    b, nb, g, dim = 4, 5, 2, 16
    attn = SparseSelfAttention(dim, 2, block_size=b, window=1, num_random_blocks=1, seed=7, max_blocks=8)
    x = torch.randn(2, g + nb * b, dim)
    valid = torch.ones(2, g + nb * b, dtype=torch.bool)
    valid[0, -6:] = False
    out = attn.bigbird(x, valid, g)

    index = attn.block_index(nb, x.device, random=True)
    assert index.shape[1] == 3 + 1
    seq_rows = torch.cat([torch.ones(nb * b, g, dtype=torch.bool), block_mask(index, b)], dim=1)
    mask = torch.cat([torch.ones(g, g + nb * b, dtype=torch.bool), seq_rows], dim=0)[None] & valid[:, None, :]
    q, k, v = attn.qkv(x)
    ref = heads_to_hidden(attn, masked_attention(q, k, v, mask[:, None]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hst_layer_equals_two_step_masked_reference():
    torch.manual_seed(2)
    b, nb, g, dim = 4, 6, 3, 16
    n = nb * b
    attn = SparseSelfAttention(dim, 2, block_size=b, window=1, max_blocks=8)  # segments of 3 blocks: last empty
    norm = RMSNorm(dim)
    reps, seq = torch.randn(2, g, dim), torch.randn(2, n, dim)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 13:] = False
    new_reps, new_seq = attn.hierarchical(reps, seq, valid, norm)

    seg = attn.segment_len(nb, g)
    assert seg == 3 * b
    gather = torch.zeros(g, g + n, dtype=torch.bool)
    gather[:, :g] = True
    for j in range(g):
        gather[j, g + j * seg: g + min(n, (j + 1) * seg)] = True
    all_valid = torch.cat([torch.ones(2, g, dtype=torch.bool), valid], dim=1)
    qs, ks, vs = attn.qkv(norm(seq))
    qr, kr, vr = attn.qkv(norm(reps))
    gather_mask = (gather[None] & all_valid[:, None])[:, None]
    gathered = masked_attention(qr, torch.cat([kr, ks], 2), torch.cat([vr, vs], 2), gather_mask)
    ref_reps = reps + heads_to_hidden(attn, gathered)
    _, kr, vr = attn.qkv(norm(ref_reps))
    local = torch.cat([torch.ones(n, g, dtype=torch.bool), block_mask(window_block_index(nb, 1), b)], dim=1)
    local_mask = (local[None] & all_valid[:, None])[:, None]
    out = masked_attention(qs, torch.cat([kr, ks], 2), torch.cat([vr, vs], 2), local_mask)
    torch.testing.assert_close(new_reps, ref_reps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_seq, seq + heads_to_hidden(attn, out), atol=1e-5, rtol=1e-5)


def test_hst_sparse_equals_dense_only_when_the_topology_covers_everything():
    torch.manual_seed(3)
    tokens = torch.randint(1, 16, (3, 16))
    tokens[2, 11:] = 0
    covering = SparseClassifier(SparseClassifierConfig.tiny("hst", max_len=16, block_size=8, num_global=1)).eval()
    torch.testing.assert_close(covering(tokens), covering(tokens, topology="dense"), atol=1e-5, rtol=1e-5)
    sparse = SparseClassifier(SparseClassifierConfig.tiny("hst", max_len=64, block_size=4, num_global=2)).eval()
    long_tokens = torch.randint(1, 16, (3, 64))
    assert (sparse(long_tokens) - sparse(long_tokens, topology="dense")).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["dense", "bigbird", "hst"])
def test_outputs_do_not_depend_on_batch_padding(mode):
    torch.manual_seed(4)
    model = SparseClassifier(SparseClassifierConfig.tiny(mode, max_len=64)).eval()
    short = torch.randint(1, 16, (1, 21))
    batch = torch.zeros(2, 60, dtype=torch.long)
    batch[0, :21] = short[0]
    batch[1] = torch.randint(1, 16, (60,))
    torch.testing.assert_close(model(short)[0], model(batch)[0], atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(mode: str, n: int) -> int:
    """Under the unfused (math) attention kernel, so every score matrix is materialised and counted."""
    torch.manual_seed(0)
    cfg = SparseClassifierConfig.tiny(mode, max_len=n, dim=16, depth=1, block_size=32, num_global=4)
    model = SparseClassifier(cfg)
    tokens = torch.randint(1, 16, (1, n))
    with sdpa_kernel(SDPBackend.MATH), LargestTensor() as probe:
        model(tokens).sum().backward()
    return probe.largest


@pytest.mark.parametrize("mode", ["bigbird", "hst"])
def test_sparse_memory_grows_linearly(mode):
    small, large = largest_tensor(mode, 1024), largest_tensor(mode, 2048)
    assert large <= 2.2 * small  # doubling n at most doubles the biggest tensor
    assert large < 2048 * 2048 // 4  # nowhere near an n x n score matrix


def test_dense_memory_probe_sees_quadratic_growth():
    small, large = largest_tensor("dense", 512), largest_tensor("dense", 1024)
    assert large >= 3.5 * small and large >= 1024 * 1024
