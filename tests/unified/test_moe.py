"""MoE layer: dispatch modes, routing inputs, auxiliary-loss-free balancing, expert masks, sub-layers; the
ultra-sparse configs."""
import inspect
from pathlib import Path

import pytest
import torch

from ernielab.core.cli import load_config
from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.io import load_model
from ernielab.unified.moe import MoEFeedForward, TopKRouter, balance_stats, expert_load, grouped_matmul
from ernielab.unified.train import UnifiedTrainConfig, VQTrainConfig, train_unified, train_vq


def make_moe(dim=16, experts=8, hidden=12, top_k=2, shared=8, seed=0):
    torch.manual_seed(seed)
    moe = MoEFeedForward(dim, experts, hidden, top_k, shared_hidden=shared)
    torch.nn.init.normal_(moe.router.proj.weight, std=0.5)
    return moe


def naive_moe(moe: MoEFeedForward, x: torch.Tensor, top_k=None, expert_mask=None) -> torch.Tensor:
    """Reference: route, then loop over every token and each of its experts."""
    index, gate = moe.router(x, top_k, expert_mask)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            out[t] += gate[t, slot] * moe.expert_forward(x[t], int(index[t, slot]))
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


DISPATCH = MoEFeedForward.DISPATCH_MODES


@pytest.mark.parametrize("dispatch", DISPATCH)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@torch.no_grad()  # the "kernel" mode is inference-only
def test_dispatch_equals_per_token_loop(top_k, dispatch):
    moe = make_moe().eval()
    moe.dispatch = dispatch
    x = torch.randn(37, 16)
    torch.testing.assert_close(moe(x, top_k=top_k), naive_moe(moe, x, top_k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_dispatch_gradients_match_loop(dispatch):
    moe = make_moe().eval()
    moe.dispatch = dispatch
    x = torch.randn(21, 16, requires_grad=True)
    if dispatch == "kernel":  # inference-only: asked for under autograd, it refuses instead of falling back
        with pytest.raises(RuntimeError, match="needs inference"):
            moe(x)
        return
    grads = []
    for fn in (lambda: moe(x), lambda: naive_moe(moe, x)):
        moe.zero_grad()
        x.grad = None
        fn().pow(2).sum().backward()
        grads.append((x.grad.clone(), moe.w_gate_up.grad.clone(), moe.w_down.grad.clone(),
                      moe.router.proj.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 5, 300])
@torch.no_grad()
def test_dispatch_modes_agree_on_skewed_masked_routing(tokens):
    """All modes give the same outputs, including empty experts, one overloaded expert (large padding
    for "padded") and masked experts."""
    moe = make_moe(experts=8, top_k=3).eval()
    moe.router.expert_bias[5] = 10.0  # every token picks expert 5
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    x = torch.randn(tokens, 16)
    outs = {}
    for mode in DISPATCH:
        moe.dispatch = mode
        outs[mode] = moe(x, expert_mask=mask)
        assert (moe.last_index == 5).any(-1).all()
    for mode in DISPATCH[1:]:
        torch.testing.assert_close(outs[mode], outs[DISPATCH[0]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", DISPATCH)
@torch.no_grad()
def test_dispatch_applies_each_gate_to_its_own_expert(dispatch):
    """Explicit (expert, gate) assignments: the result is sum_j gate_j * expert_{index_j}(x); the same
    gates on swapped experts give a different result, so a mix-up of gates and experts cannot pass."""
    moe = make_moe(experts=6).eval()
    moe.dispatch = dispatch
    x = torch.randn(4, 16)
    index = torch.tensor([[0, 5], [5, 0], [2, 3], [3, 3]])
    gate = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.5, 0.5]])
    expected = torch.stack([sum(g * moe.expert_forward(x[t], int(e)) for e, g in zip(index[t], gate[t]))
                            for t in range(4)])
    torch.testing.assert_close(moe.experts(x, index, gate), expected, atol=1e-5, rtol=1e-5)
    swapped = moe.experts(x, index.flip(1), gate)
    assert not torch.allclose(swapped[:3], expected[:3], atol=1e-3)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        moe.dispatch = "dense"


def test_unfused_checkpoints_load_into_fused_weights():
    moe = make_moe()
    old = {k: v for k, v in moe.state_dict().items() if k != "w_gate_up"}
    old["w_gate"], old["w_up"] = moe.w_gate.clone(), moe.w_up.clone()  # the pre-fusion layout
    fresh = make_moe(seed=1)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.w_gate_up, moe.w_gate_up, atol=0, rtol=0)


def test_grouped_matmul_with_empty_groups():
    for width in (8, 5):  # 8 meets grouped_mm's alignment, 5 takes the loop fallback
        x, w = torch.randn(10, 4), torch.randn(3, 4, width)
        counts = torch.tensor([4, 0, 6])
        expected = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)


def test_router_sees_only_the_token_representation():
    params = list(inspect.signature(TopKRouter.forward).parameters)
    assert params == ["self", "x", "top_k", "expert_mask"]
    moe = make_moe().eval()
    x = torch.randn(5, 16)
    # identical hidden states are routed identically wherever they sit in the batch
    index, _ = moe.router(torch.cat([x, torch.randn(7, 16), x]))
    assert torch.equal(index[:5], index[-5:])


def test_gates_renormalised_and_selection_uses_bias():
    router = TopKRouter(8, 6, top_k=2).eval()
    x = torch.randn(50, 8)
    _, gate = router(x)
    torch.testing.assert_close(gate.sum(-1), torch.ones(50))
    router.expert_bias[3] = 10.0  # a large bias forces expert 3 into every selection...
    index, gate2 = router(x)
    assert (index == 3).any(-1).all()
    scores = torch.sigmoid(router.proj(x))
    # ...but the gate is still the affinity, not affinity + bias
    torch.testing.assert_close(gate2, scores.gather(-1, index) / scores.gather(-1, index).sum(-1, keepdim=True))


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    router = TopKRouter(8, 8, top_k=2, balance_rate=0.005)
    x = torch.randn(512, 8)
    x[:, 0] = 1.0  # a feature every token shares...
    with torch.no_grad():
        router.proj.weight.normal_()
        router.proj.weight[:2, 0] = 2.0  # ...that experts 0 and 1 favour: a skewed start

    def route_and_update():
        router(x)
        return balance_stats(router.update_bias())["max_over_mean"]

    router.train()
    imbalance = [route_and_update() for _ in range(60)]
    assert imbalance[0] > 1.8 and max(imbalance[-10:]) < 1.2
    assert router.expert_bias[:2].max() < 0  # the favoured experts were pushed down


def test_bias_update_ignores_masked_experts_and_tracks_usage():
    router = TopKRouter(8, 6, top_k=2).train()
    mask = torch.tensor([True, True, True, False, True, False])
    router(torch.randn(64, 8), expert_mask=mask)
    assert router.gate_mass[~mask].sum() == 0 and router.gate_mass[mask].sum() > 0
    router.update_bias(mask)
    assert torch.all(router.expert_bias[~mask] == 0)


def test_masked_experts_never_receive_tokens():
    moe = make_moe(experts=8, top_k=3).eval()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 4, 6, 7]] = True
    x = torch.randn(200, 16)
    out = moe(x, expert_mask=mask)
    assert set(moe.last_index.unique().tolist()) <= {1, 4, 6, 7}
    assert expert_load(moe.last_index, 8)[~mask].sum() == 0
    torch.testing.assert_close(out, naive_moe(moe, x, expert_mask=mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="experts left by the mask"):
        moe(x, top_k=5, expert_mask=mask)


def test_keep_experts_equals_masked_layer():
    moe = make_moe(experts=8, top_k=2).eval()
    keep = torch.tensor([0, 2, 5, 6])
    mask = torch.zeros(8, dtype=torch.bool)
    mask[keep] = True
    small = moe.keep_experts(keep).eval()
    x = torch.randn(40, 16)
    assert small.num_experts == 4 and small.w_gate.shape[0] == 4 and small.w_gate_up.shape[0] == 4
    torch.testing.assert_close(small(x), moe(x, expert_mask=mask), atol=1e-6, rtol=1e-6)


def test_balance_stats():
    assert balance_stats(torch.tensor([5, 5, 5, 5]))["max_over_mean"] == pytest.approx(1.0)
    skew = balance_stats(torch.tensor([12, 0, 0, 0]))
    assert skew["max_over_mean"] == pytest.approx(4.0) and skew["entropy"] == pytest.approx(0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_moe_layer_trains_one_step(dtype):
    """A layer cast to bf16 (or fp16) keeps its routing statistics and bias in float32 with their exact values,
    and trains: forward, backward, optimizer step, balancing step."""
    moe = make_moe(experts=8, top_k=2)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-1, 1, 8) * 1.001)  # values bf16 cannot hold exactly
    bias = moe.router.expert_bias.clone()
    moe = moe.to(dtype).train()
    assert moe.w_gate_up.dtype == dtype
    assert all(getattr(moe.router, n).dtype == torch.float32 for n in TopKRouter.FLOAT32_BUFFERS)
    assert torch.equal(moe.router.expert_bias, bias)
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    before = moe.w_down.detach().clone()
    out = moe(torch.randn(32, 16).to(dtype))
    assert out.dtype == dtype
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in moe.parameters())
    opt.step()
    load = moe.router.update_bias()
    assert int(load.sum()) == 32 * 2 and moe.router.gate_mass.sum() == pytest.approx(32.0)
    assert not torch.equal(moe.router.expert_bias, bias) and not torch.equal(moe.w_down, before)
    moe.float()  # and back: the statistics were never rounded
    assert moe.router.gate_mass.dtype == torch.float32 and moe.w_gate_up.dtype == torch.float32


# ---- ultra-sparse configs (ERNIE 5.0 activates under 3% of its experts) -------------------------------------------
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "unified"
ULTRA = sorted(CONFIGS.glob("ultra_*.json"))


def test_ultra_sparse_configs_match_the_moe_run_but_for_the_experts():
    """Each ultra config is configs/unified/moe_3k.json with more, sparser experts: under 3.2% of them active,
    the same active routed width (so the same dense twin) and every other setting equal."""
    base = load_config(UnifiedTrainConfig, CONFIGS / "moe_3k.json")
    assert [p.stem for p in ULTRA] == ["ultra_e128_k2_3k", "ultra_e128_k4_3k", "ultra_e64_k2_3k"]
    for path in ULTRA:
        cfg = load_config(UnifiedTrainConfig, path)
        m = cfg.model
        assert m.top_k / m.num_experts < 0.032 and m.num_experts >= 4 * base.model.num_experts
        assert m.top_k * m.expert_hidden == base.model.top_k * base.model.expert_hidden
        assert m.dense_twin().dense_hidden == base.model.dense_twin().dense_hidden
        assert m.replace(num_experts=16, expert_hidden=64, top_k=4) == base.model
        assert cfg.replace(model=base.model, output_dir=base.output_dir) == base
        assert f"ultra_e{m.num_experts}_k{m.top_k}" in cfg.output_dir


@pytest.mark.parametrize("experts, top_k", [(64, 2), (128, 4), (128, 2)])
def test_ultra_sparse_routing_balances_without_an_auxiliary_loss(experts, top_k):
    """The bias update alone evens out a skewed start with 64-128 experts and k = 2-4: four experts favoured by a
    feature every token shares first take 8-12x the mean load; within 80 updates the busiest expert stays
    under 1.4x the mean, and the favoured experts' bias went down."""
    torch.manual_seed(0)
    router = TopKRouter(32, experts, top_k=top_k, balance_rate=UnifiedConfig().balance_rate).train()
    x = torch.randn(2048, 32)
    x[:, 0] = 3.0
    with torch.no_grad():
        router.proj.weight.normal_(std=32 ** -0.5)
        router.proj.weight[:4, 0] = 0.5  # +1.5 logits for experts 0-3 on every token
    imbalance = []
    for _ in range(80):
        router(x)
        imbalance.append(balance_stats(router.update_bias())["max_over_mean"])
    assert imbalance[0] > 6 and max(imbalance[-10:]) < 1.4
    assert router.expert_bias[:4].max() < 0 and router.expert_bias[:4].mean() < router.expert_bias[4:].mean() - 0.05


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    train_vq(VQTrainConfig(output_dir=str(out), model=VQConfig.tiny(), steps=2, batch_size=4, train_size=16,
                           eval_size=4, save_every=2))
    return out


@pytest.mark.parametrize("path", ULTRA, ids=lambda p: p.stem)
def test_ultra_sparse_config_trains_at_tiny_size(path, tiny_vq, tmp_path):
    """The config's expert count and k on the tiny trunk (active routed width 32) train through the engine,
    elastic draws included; the exported model keeps every expert and the balancing bias moved."""
    cfg = load_config(UnifiedTrainConfig, path)
    m = cfg.model
    model = UnifiedConfig.tiny(num_experts=m.num_experts, top_k=m.top_k, expert_hidden=32 // m.top_k)
    result = train_unified(cfg.replace(output_dir=str(tmp_path), vq_dir=str(tiny_vq), model=model, steps=3,
                                       batch_size=2, train_size=16, log_every=1, save_every=3))
    assert result["step"] == 3 and result["exported"]
    trained, _, _ = load_model(tmp_path / "model")
    layers = [moe for _, moe in trained.moe_layers()]
    assert layers and all(moe.num_experts == m.num_experts and moe.top_k == m.top_k for moe in layers)
    assert all(moe.router.expert_bias.abs().sum() > 0 for moe in layers)
    assert all(torch.isfinite(p).all() for p in trained.parameters())
