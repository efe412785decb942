"""The trimmed MoE dispatch of the unified model, and the "gpu" dispatch, compute what the previous dispatch computed.

`PreviousMoE` below is the fused dispatch as it was before the decoding-speed round of docs/unified.md
("Where the MoE's extra time goes"): argsort + bincount + cumsum, advanced-index gather, scatter-add onto
zeros, shared expert added afterwards. The current layer must give the same outputs (to float
tolerance), the same greedy tokens, the same gradients, and must leave the training-only load statistics
alone at inference.
"""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ernielab.unified.config import UnifiedConfig
from ernielab.unified.generate import caption_codes, generate_image_codes
from ernielab.unified.io import load_model
from ernielab.unified.model import UnifiedTransformer, unified_loss
from ernielab.unified.moe import MoEFeedForward, expert_load, group_ends, grouped_matmul
from ernielab.unified.moe_gpu import padded_layout, sorted_grouped_experts
from ernielab.unified.sequences import collate, model_inputs, text_to_image_sequence
from ernielab.unified.tokenizer import TextTokenizer, build_text_vocab

# a trained MoE folder: runs/unified_3k by default, any other through ERNIELAB_TRAINED_UNIFIED
TRAINED = Path(os.environ.get("ERNIELAB_TRAINED_UNIFIED",
                              Path(__file__).resolve().parents[2] / "runs" / "unified_3k" / "moe" / "model"))


class PreviousMoE(MoEFeedForward):
    """The previous round's "fused" forward, kept as the reference."""

    def forward(self, x, top_k=None, expert_mask=None):
        flat = x.reshape(-1, x.shape[-1])
        index, gate = self.router(flat, top_k, expert_mask)
        self.last_index = index.detach()
        k = index.shape[1]
        flat_expert = index.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)
        routed = flat[token]
        gate_up = grouped_matmul(routed, self.w_gate_up, counts, offsets)
        hidden = F.gelu(gate_up[:, : self.expert_hidden].contiguous()) * gate_up[:, self.expert_hidden:]
        out = grouped_matmul(hidden, self.w_down, counts, offsets) * gate.reshape(-1)[order, None]
        out = torch.zeros_like(flat).index_add_(0, token, out)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(x.shape)


def as_previous(moe: MoEFeedForward) -> PreviousMoE:
    ref = PreviousMoE(moe.w_gate_up.shape[1], moe.num_experts, moe.expert_hidden, moe.top_k,
                      moe.shared.up_proj.out_features if moe.shared is not None else 0, moe.router.balance_rate)
    ref.load_state_dict(moe.state_dict())
    return ref.train(moe.training)


def with_previous_layers(model: UnifiedTransformer) -> UnifiedTransformer:
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.ffn = as_previous(block.ffn)
    return ref


def make_moe(shared=16, seed=0):
    torch.manual_seed(seed)
    moe = MoEFeedForward(32, 8, 16, 2, shared_hidden=shared)
    torch.nn.init.normal_(moe.router.proj.weight, std=0.5)
    return moe.eval()


@pytest.mark.parametrize("tokens", [1, 3, 8, 64, 300])
@pytest.mark.parametrize("shared", [0, 16])
@pytest.mark.parametrize("grad", [False, True])
def test_layer_matches_previous_dispatch(tokens, shared, grad):
    moe = make_moe(shared)
    ref = as_previous(moe)
    x = torch.randn(tokens, 32)
    with torch.set_grad_enabled(grad):
        for top_k, mask in ((None, None), (1, None), (2, torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool))):
            torch.testing.assert_close(moe(x, top_k, mask), ref(x, top_k, mask), atol=1e-6, rtol=1e-6)
            assert torch.equal(moe.last_index, ref.last_index)


@pytest.mark.parametrize("dispatch", MoEFeedForward.DISPATCH_MODES)
def test_every_dispatch_matches_previous_on_skewed_routing(dispatch):
    """All tokens on the same experts (the capacity extreme of the padded mode) and k = all experts."""
    moe = make_moe()
    moe.dispatch = dispatch
    x = torch.randn(1, 32).repeat(20, 1)  # identical tokens route identically
    with torch.no_grad():
        torch.testing.assert_close(moe(x), as_previous(moe)(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(moe(x, top_k=8), as_previous(moe)(x, top_k=8), atol=1e-6, rtol=1e-6)


def test_training_gradients_match_previous_dispatch():
    moe = make_moe().train()
    ref = as_previous(moe)
    x = torch.randn(40, 32)
    weights = torch.randn(40, 32)
    for layer in (moe, ref):
        (layer(x) * weights).sum().backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(moe.router.pending_load, ref.router.pending_load)


def test_inference_leaves_training_statistics_alone():
    moe = make_moe()
    moe.router.pending_load.fill_(3.0)
    moe.router.gate_mass.fill_(2.0)
    with torch.no_grad():
        moe(torch.randn(16, 32))
    assert torch.all(moe.router.pending_load == 3.0) and torch.all(moe.router.gate_mass == 2.0)


def test_group_ends_and_grouped_matmul_from_offsets():
    sorted_ids = torch.tensor([0, 0, 2, 2, 2, 4])
    offsets = group_ends(sorted_ids, 6)
    assert offsets.dtype == torch.int32 and offsets.tolist() == [2, 2, 5, 5, 6, 6]
    x = torch.randn(6, 4)
    for width in (8, 5):  # 8 meets grouped_mm's alignment, 5 takes the loop fallback
        w = torch.randn(6, 4, width)
        expected = torch.cat([x[:2] @ w[0], x[2:5] @ w[2], x[5:] @ w[4]])
        torch.testing.assert_close(grouped_matmul(x, w, offsets=offsets), expected)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=build_text_vocab(), num_layers=2))
    for name, p in model.named_parameters():  # untrained heads are near zero: make outputs informative
        if "head" in name or "embed" in name or "image_pos" in name:
            torch.nn.init.normal_(p, std=1.0)
    return model.eval()


def greedy_decodes(model, prompts, codes):
    images, _ = generate_image_codes(model, prompts, temperature=0.0)
    captions, _ = caption_codes(model, codes)
    return images, captions


def test_greedy_decoding_unchanged_on_a_tiny_model():
    model = tiny_model()
    tok = TextTokenizer(model.config.text_vocab)
    prompts = [tok.encode(p) for p in ("a red circle", "two blue squares", "a green triangle left of a circle")]
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4))
    new, old = greedy_decodes(model, prompts, codes), greedy_decodes(with_previous_layers(model), prompts, codes)
    assert torch.equal(new[0], old[0]) and new[1] == old[1]
    batch = collate([text_to_image_sequence(p, c) for p, c in zip(prompts, codes)])
    with torch.no_grad():
        h_new, h_old = model(**model_inputs(batch)), with_previous_layers(model)(**model_inputs(batch))
    torch.testing.assert_close(h_new, h_old, atol=1e-5, rtol=1e-5)
    model.train()
    loss_new, _ = unified_loss(model, batch)
    loss_old, _ = unified_loss(with_previous_layers(model).train(), batch)
    torch.testing.assert_close(loss_new, loss_old, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not TRAINED.exists(), reason=f"needs a trained unified MoE at {TRAINED}")
@pytest.mark.parametrize("batch", [8, 32])
def test_greedy_decoding_unchanged_on_the_trained_model(batch):
    """The benchmark's own decodes (batch 8 and 32): same image codes and captions token for token."""
    from ernielab.unified.evaluation import heldout
    from ernielab.worlds.shapes import make_prompts

    model, vq, _ = load_model(TRAINED)
    tok = TextTokenizer(model.config.text_vocab)
    prompts = [tok.encode(p) for p in make_prompts("single", batch, seed=1)]
    images, _ = heldout(batch, vq.config.image_size, seed=0)
    codes = vq.encode(images)
    new, old = greedy_decodes(model, prompts, codes), greedy_decodes(with_previous_layers(model), prompts, codes)
    assert torch.equal(new[0], old[0]) and new[1] == old[1]


# ---- the "gpu" dispatch (moe_gpu.py): padded layout, exactness against the reference, no host sync ------------

@pytest.mark.parametrize("align", [1, 4, 16])
def test_padded_layout_puts_each_expert_group_on_aligned_rows(align):
    torch.manual_seed(align)
    experts = 7
    ids = torch.randint(0, experts, (45,))
    ids[ids == 3] = 4  # an empty expert in the middle
    sorted_ids, _ = ids.sort(stable=True)
    row, ends, rows = padded_layout(sorted_ids, experts, align)
    assert ends.dtype == torch.int32 and int(ends[-1]) == rows == 45 + experts * (align - 1)
    assert len(set(row.tolist())) == 45 and int(row.max()) < rows  # every assignment its own row
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()
    for e in range(experts):
        mine = row[sorted_ids == e]
        assert int(starts[e]) % align == 0
        assert mine.tolist() == list(range(int(starts[e]), int(starts[e]) + len(mine)))  # consecutive from its start
        if e < experts - 1:  # groups hold their rows rounded up to `align`; the last one takes the slack
            assert int(ends[e]) - int(starts[e]) == -(-len(mine) // align) * align


@pytest.mark.parametrize("align", [1, 3, 16])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_gpu_dispatch_matches_reference_forward_and_gradients(align, tokens):
    """The sorted, padded dispatch against the per-expert loop (`expert_forward`) in float32: outputs and the
    gradients of input, gates and both expert weights."""
    moe = make_moe()
    x = torch.randn(tokens, 32, requires_grad=True)
    index = torch.randint(0, 8, (tokens, 2))
    index[:, 1] = (index[:, 0] + 1 + torch.randint(0, 7, (tokens,))) % 8  # two distinct experts per token
    gate = torch.rand(tokens, 2, requires_grad=True)
    base = torch.randn(tokens, 32)
    out = sorted_grouped_experts(x, index, gate, moe.w_gate_up, moe.w_down, grouped_matmul, align, base.clone())
    expected = base + sum(gate[:, j, None] * torch.stack([moe.expert_forward(x[t], int(index[t, j]))
                                                          for t in range(tokens)] or [x.new_zeros(32)])[:tokens]
                          for j in range(2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if not tokens:
        return
    weights = torch.randn(tokens, 32)
    grads = [torch.autograd.grad((o * weights).sum(), (x, gate, moe.w_gate_up, moe.w_down))
             for o in (out, expected)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k, mask", [(None, None), (1, None), (8, None),
                                         (2, (1, 0, 1, 1, 0, 1, 1, 1))])
def test_gpu_mode_layer_trains_like_the_previous_dispatch(top_k, mask):
    """The whole layer in "gpu" mode, training: outputs, every parameter's gradient and the router's load
    record equal the previous dispatch's (top-k 1, all 8 experts, an expert mask)."""
    moe = make_moe().train()
    moe.dispatch = "gpu"
    ref = as_previous(moe)
    mask = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    x = torch.randn(60, 32)
    weights = torch.randn(60, 32)
    for layer in (moe, ref):
        out = layer(x, top_k, mask)
        (out * weights).sum().backward()
    torch.testing.assert_close(moe(x, top_k, mask), ref(x, top_k, mask), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(moe.router.pending_load, ref.router.pending_load)


def test_gpu_mode_traces_whole_without_host_sync():
    """torch.compile(fullgraph=True) fails on any graph break, and a host read (.item(), .tolist(), nonzero,
    bincount's size) is one: the bf16 layer in "gpu" mode (router statistics included) traces whole, forward
    and backward (aot_eager: no C++ compiler needed), at two token counts, and computes what eager does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoEFeedForward(32, 8, 16, 2, shared_hidden=16, dispatch="gpu").to(torch.bfloat16).train()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager", dynamic=True)
    try:
        for tokens in (40, 72):
            x = torch.randn(tokens, 32, dtype=torch.bfloat16)
            load = moe.router.pending_load.clone()
            out = compiled(x)
            out.float().square().sum().backward()
            assert torch.equal(moe.router.pending_load - load, expert_load(moe.last_index, 8).float())
            grad, moe.w_gate_up.grad = moe.w_gate_up.grad, None
            torch.testing.assert_close(out, moe(x), atol=0, rtol=0)
            moe(x).float().square().sum().backward()
            torch.testing.assert_close(grad, moe.w_gate_up.grad, atol=0, rtol=0)
            moe.zero_grad()
    finally:
        torch._dynamo.reset()
