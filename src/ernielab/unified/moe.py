"""Mixture-of-experts feed-forward: top-k routing, auxiliary-loss-free balancing, grouped dispatch.

Routing (DeepSeek-V3 / ERNIE 5.0 style):
- the router sees the token representation only: `forward(x)` takes no modality or task input, so the
  same hidden state goes to the same experts whether it came from a word or an image patch;
- affinities are sigmoid(x W_r); experts are *selected* by affinity + a per-expert bias, but *weighted*
  by the affinities alone (renormalised over the selected experts, so any top-k yields an output of the
  same scale: elastic top-k needs no rescaling);
- the bias is not learned by gradients: after each optimiser step `update_bias` nudges it up for
  under-loaded experts and down for over-loaded ones (no auxiliary loss term distorts the LM loss);
- an expert mask removes experts from selection (elastic width, extracted sub-models).

Dispatch (exact implementations of the same sparse computation, chosen by `MoEFeedForward.dispatch`;
none has a Python loop over tokens and none evaluates an expert on tokens not routed to it):
- "auto" (default): "kernel" where it applies (inference, float32 on CPU, the kernel built, and one torch
  thread or at most `KERNEL_MAX_ASSIGNMENTS` assignments, since the kernel runs on one thread), else
  "fused". Training always takes "fused".
- "kernel": the fused C kernel of `moe_kernel.py` (kernels/moe_experts.c): counting sort by expert,
  then per expert and block of its tokens the gate|up product, gelu * up, the down product and the
  gate-weighted add into the output, in one call. It replaces about ten torch ops and the per-expert
  matmuls inside CPU grouped_mm, whose fixed costs dominate decoding (docs/unified.md).
- "fused" (the torch path, used in training): the (token, expert) assignments are sorted by expert,
  tokens gathered into one contiguous [N*k, D] block, and each expert's slice multiplied by its own
  weights with grouped matmuls (`torch.nn.functional.grouped_mm`, a loop over experts where it is
  missing); the weighted results are scattered back with `index_add_`. The gate and up projections
  are stored fused ([E, D, 2H]), so one grouped matmul computes both: on CPU grouped_mm runs one small
  matmul per expert, and per-call overhead, not arithmetic, dominates at decoding sizes, so 2 grouped
  matmuls instead of 3 is faster.
- "grouped": the same with separate gate and up grouped matmuls (the pre-fusion dispatch, kept to
  measure against).
- "gpu": the dispatch designed for GPUs (`moe_gpu.py`): no host synchronisation (every size follows from the
  input's shape, so CUDA graphs and torch.compile take the whole layer), one sort, expert groups padded
  with zero rows to `moe_gpu.GPU_GROUP_ALIGN` rows for grouped GEMM kernels, gate|up fused, the gate folded
  into the hidden rows, and no atomic adds (tokens leave the buffer by a gather and a sum over their k
  rows). On the CPU it computes the same values as the other modes (tested); its speed is a GPU question
  (benchmarks/gpu_moe_hst.py).
- "padded": every assignment gets a slot in its expert's row of a zero-padded [E, C, D] buffer, C = the
  most tokens any expert received *in this call* (nothing is dropped), and each weight is applied with
  one `torch.bmm` over all experts. Not the default: it pays for the padding (C is set by the busiest
  expert), and although it beats "fused" on an isolated layer at up to 16 tokens per call, it was
  slower inside whole decoding steps (batch 8 and 32, docs/unified.md).

Small calls (decoding) on CPU pay a few µs of fixed cost per op, so the layer keeps its op count low
(docs/unified.md, "Where the MoE's extra time goes"). Each item below computes the same values, up to
float rounding from a different summation order:
- the sorting dispatches sort once (values and order together), find group ends with one
  `searchsorted`, gather with `index_select` and scatter-add onto the shared expert's output (no zero
  fill, no final add);
- gelu reads the gate half of the fused projection in place up to `STRIDED_GELU_MAX_ROWS` rows (a copy
  first is only worth it above);
- at inference (autograd off) the router and the shared expert's gate and up projections, which read
  the same input, are one matmul with their weights stacked (a cached copy, see `input_projection`);
  with autograd on, the modules run separately on their own parameters.
The router's load statistics (`pending_load`, `gate_mass`) are training-only: eval mode skips them. They and
the balancing bias stay float32 when the layer is cast (`.to(torch.bfloat16)`), so a bf16 layer trains.
"""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.layers.mlp import GeGLU
from ernielab.unified import moe_gpu, moe_kernel

# public from torch 2.10; torch 2.8-2.9 have only the private op, on CUDA
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor | None = None,
                   offsets: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, D] sorted into consecutive groups of `counts` rows, weight [E, D, H] -> [M, H].

    Group e is multiplied by weight[e]; empty groups are allowed. Give `counts`, or `offsets` (the int32
    cumsum of counts: the end row of every group), or both when several matmuls share one grouping.
    """
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape[1:])  # grouped_mm's stride rule
    # on CUDA the kernels take bf16 (other dtypes may be refused); the private op of torch < 2.10 is CUDA-only
    usable = _GROUPED_MM is not None and (x.dtype == torch.bfloat16 if x.is_cuda else hasattr(F, "grouped_mm"))
    if usable and aligned and x.dtype == weight.dtype and x.shape[0] > 0:
        offsets = counts.cumsum(0, dtype=torch.int32) if offsets is None else offsets
        return _GROUPED_MM(x.contiguous(), weight, offs=offsets)
    if counts is None:
        counts = offsets.diff(prepend=offsets.new_zeros(1))
    parts = [chunk @ weight[e] for e, chunk in enumerate(x.split(counts.tolist())) if chunk.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[-1])


# "auto" dispatch: above this many (token, expert) assignments with several torch threads, the threaded
# torch path is left to do the work (the C kernel is single-threaded)
KERNEL_MAX_ASSIGNMENTS = 1024

# gelu of a strided half costs less than copy + contiguous gelu up to about this many rows on CPU, and
# about 15% more from 4096 rows (measured, docs/unified.md); both give the same values
STRIDED_GELU_MAX_ROWS = 1024


def gelu_times_up(gate_up: torch.Tensor, hidden: int) -> torch.Tensor:
    """gelu(gate) * up from a fused [..., 2 * hidden] projection (gate first)."""
    gate, up = gate_up[..., :hidden], gate_up[..., hidden:]
    if gate_up.numel() > STRIDED_GELU_MAX_ROWS * gate_up.shape[-1]:
        gate = gate.contiguous()
    return F.gelu(gate) * up


@functools.lru_cache(maxsize=16)
def _group_ids(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def group_ends(sorted_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """int32 end row of every group 0..num_groups-1 in ascending ids (= cumsum of the group sizes)."""
    return torch.searchsorted(sorted_ids, _group_ids(num_groups, sorted_ids.device), right=True, out_int32=True)


def expert_load(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert: index [..., k] of expert ids -> int64 counts [E]. A scatter-add into E slots
    rather than bincount, whose CUDA kernel reads the largest id back to the host to size its output."""
    flat = index.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def balance_stats(counts: torch.Tensor, active: torch.Tensor | None = None) -> dict[str, float]:
    """Load balance of one counts vector over the active experts.

    max_over_mean: busiest expert's load / mean load (1 = perfect; "MaxVio" + 1);
    cv: coefficient of variation; entropy: normalised entropy of the load distribution (1 = uniform).
    """
    counts = counts.double()
    if active is not None:
        counts = counts[active]
    total = counts.sum()
    if total <= 0:
        return {"max_over_mean": float("nan"), "cv": float("nan"), "entropy": float("nan"), "tokens": 0}
    mean = counts.mean()
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum() / math.log(max(2, counts.numel()))
    return {"max_over_mean": float(counts.max() / mean), "cv": float(counts.std(unbiased=False) / mean),
            "entropy": float(entropy), "tokens": int(total)}


class TopKRouter(nn.Module):
    """Sigmoid affinities, biased top-k selection, renormalised gates; bias balanced without a loss."""

    def __init__(self, dim: int, num_experts: int, top_k: int, balance_rate: float = 1e-2):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.balance_rate = num_experts, top_k, balance_rate
        self.proj = nn.Linear(dim, num_experts, bias=False)
        # selection bias (balanced by update_bias); routed gate mass per expert, a usage record that
        # extraction uses to pick which experts a narrower sub-model keeps
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("gate_mass", torch.zeros(num_experts))
        self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)

    FLOAT32_BUFFERS = ("expert_bias", "gate_mass", "pending_load")

    def _apply(self, fn, recurse=True):
        """Module casts (`.to(torch.bfloat16)`, `.half()`) move the routing statistics and bias but keep them
        float32, with their exact values: loads are counts (bf16 holds integers exactly only up to 256), the
        bias moves in steps of `balance_rate`, and `route` adds float32 gates into `gate_mass`."""
        before = {name: getattr(self, name) for name in self.FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor, top_k: int | None = None,
                expert_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert index [N, k] int64, gate [N, k] in x's dtype, rows summing to 1)."""
        return self.route(self.proj(x), top_k, expert_mask)

    def route(self, logits: torch.Tensor, top_k: int | None = None,
              expert_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` after the projection: router logits [N, E] -> (expert index, gate)."""
        k = top_k or self.top_k
        available = self.num_experts if expert_mask is None else int(expert_mask.sum())
        if not 1 <= k <= available:
            raise ValueError(f"top_k {k} must be in [1, {available}] (the experts left by the mask)")
        scores = torch.sigmoid(logits.float())
        select = scores.detach() + self.expert_bias
        if expert_mask is not None:
            select = select.masked_fill(~expert_mask, float("-inf"))
        index = select.topk(k, dim=-1).indices
        gate = scores.gather(-1, index)
        gate = gate / gate.sum(-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.pending_load += expert_load(index, self.num_experts).to(self.pending_load.dtype)
                self.gate_mass.index_add_(0, index.reshape(-1), gate.detach().reshape(-1))
        return index, gate.to(logits.dtype)

    @torch.no_grad()
    def update_bias(self, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One balancing step from the load gathered since the last call; returns that load.

        Experts under the mean load (among the unmasked ones) gain `balance_rate`, experts above it lose
        it. Masked experts saw no tokens by construction, so their bias is left alone.
        """
        load = self.pending_load.clone()
        self.pending_load.zero_()
        active = torch.ones_like(load, dtype=torch.bool) if expert_mask is None else expert_mask
        if load[active].sum() > 0:
            error = load[active].mean() - load
            self.expert_bias += torch.where(active, self.balance_rate * error.sign(), 0.0)
        return load


class MoEFeedForward(nn.Module):
    """Routed GeGLU experts plus an optional always-on shared GeGLU expert.

    Expert weights are stacked over experts: gate and up fused as w_gate_up [E, D, 2H] (`w_gate` and
    `w_up` are views of its halves), down as w_down [E, H, D].
    """

    DISPATCH_MODES = ("auto", "kernel", "fused", "grouped", "padded", "gpu")
    gpu_group_align = moe_gpu.GPU_GROUP_ALIGN  # "gpu" mode: expert groups padded to a multiple of this many rows

    def __init__(self, dim: int, num_experts: int, expert_hidden: int, top_k: int, shared_hidden: int = 0,
                 balance_rate: float = 1e-2, dispatch: str = "auto"):
        super().__init__()
        self.num_experts, self.expert_hidden = num_experts, expert_hidden
        self.dispatch = dispatch  # a speed choice only: every mode computes the same outputs
        self.router = TopKRouter(dim, num_experts, top_k, balance_rate)
        std_in, std_out = dim ** -0.5, expert_hidden ** -0.5
        w_gate = torch.randn(num_experts, dim, expert_hidden) * std_in
        w_up = torch.randn(num_experts, dim, expert_hidden) * std_in
        self.w_gate_up = nn.Parameter(torch.cat([w_gate, w_up], -1))
        self.w_down = nn.Parameter(torch.randn(num_experts, expert_hidden, dim) * std_out)
        self.shared = GeGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.last_index: torch.Tensor | None = None  # [N, k] of the latest call, for load statistics
        self._input_projection: tuple | None = None  # (sources, versions, stacked): see input_projection

    @property
    def w_gate(self) -> torch.Tensor:
        return self.w_gate_up[..., : self.expert_hidden]

    @property
    def w_up(self) -> torch.Tensor:
        return self.w_gate_up[..., self.expert_hidden:]

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, mode: str) -> None:
        if mode not in self.DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {self.DISPATCH_MODES}, got {mode!r}")
        self._dispatch = mode

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = (prefix + "w_gate", prefix + "w_up")
        if all(k in state_dict for k in old):  # written before gate and up were fused
            state_dict[prefix + "w_gate_up"] = torch.cat([state_dict.pop(old[0]), state_dict.pop(old[1])], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor, top_k: int | None = None,
                expert_mask: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.shared is not None and not torch.is_grad_enabled():
            index, gate, base = self.route_and_shared(flat, top_k, expert_mask)
        else:
            index, gate = self.router(flat, top_k, expert_mask)
            base = self.shared(flat) if self.shared is not None else None
        self.last_index = index  # integer ids: nothing to detach
        return self.experts(flat, index, gate, base).reshape(x.shape)

    def route_and_shared(self, x: torch.Tensor, top_k: int | None,
                         expert_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference: the router logits and the shared expert's gate and up projections of x in one matmul
        (they read the same input; see `input_projection`), then routing and the shared expert's output.
        The same math as `self.router(x)` and `self.shared(x)` (GeGLU: down(gelu(gate) * up))."""
        logits, shared_gate, shared_up = F.linear(x, self.input_projection()).split(
            [self.num_experts, self.shared.gate_proj.out_features, self.shared.up_proj.out_features], dim=1)
        index, gate = self.router.route(logits, top_k, expert_mask)
        shared = F.linear(F.gelu(shared_gate) * shared_up, self.shared.down_proj.weight)
        return index, gate, shared

    def input_projection(self) -> torch.Tensor:
        """[E + 2 Hs, D]: router weight, shared gate and shared up stacked. A cached copy for inference,
        rebuilt when a source weight is replaced (identity), moved (storage pointer: `.to()` swaps
        `.data`) or changed in place (version counter, bumped by optimiser steps, load_state_dict, copy_
        and nn.init; in-place writes through `.data` bypass it and would need
        `self._input_projection = None`)."""
        sources = (self.router.proj.weight, self.shared.gate_proj.weight, self.shared.up_proj.weight)
        versions = tuple((w._version, w.data_ptr()) for w in sources)
        cached = self._input_projection
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], sources)):
            with torch.no_grad():
                cached = (sources, versions, torch.cat(sources))
            self._input_projection = cached
        return cached[2]

    def experts(self, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """base + sum_j gate[:, j] * expert_{index[:, j]}(x) for x [N, D], index and gate [N, k]; base
        (e.g. the shared expert's output, [N, D]) defaults to zeros and may be overwritten."""
        mode = self.resolved_dispatch(index.numel(), x)
        if mode == "kernel":
            out = x.new_zeros(x.shape) if base is None else base
            return moe_kernel.routed_experts(x, index, gate, self.w_gate_up, self.w_down, out)
        if mode == "gpu":
            return moe_gpu.sorted_grouped_experts(x, index, gate, self.w_gate_up, self.w_down, grouped_matmul,
                                                  self.gpu_group_align, base)
        if mode == "padded" and index.numel():
            out = self.padded_experts(x, index, gate)
            return out if base is None else base + out
        return self.grouped_experts(x, index, gate, fused=mode != "grouped", base=base)

    def resolved_dispatch(self, assignments: int, x: torch.Tensor) -> str:
        """The mode a call of `assignments` (token, expert) pairs on x runs: resolves "auto", and checks
        that a requested "kernel" can run."""
        if self.dispatch not in ("auto", "kernel"):
            return self.dispatch
        usable = moe_kernel.supports(x, self.w_gate_up, self.w_down) and moe_kernel.load() is not None
        if self.dispatch == "kernel":
            if not usable:
                raise RuntimeError("dispatch 'kernel' needs inference (no autograd), float32 on CPU and a built "
                                   "kernel (a C compiler; ERNIELAB_NO_KERNELS unset)")
            return "kernel"
        small = assignments <= KERNEL_MAX_ASSIGNMENTS or torch.get_num_threads() == 1
        return "kernel" if usable and small else "fused"

    def grouped_experts(self, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor,
                        fused: bool = True, base: torch.Tensor | None = None) -> torch.Tensor:
        """Sort assignments by expert, grouped matmuls (gate|up fused or not, then down), scatter-add back
        onto `base` (in place; zeros when None: the shared expert's output saves a zero fill and an add)."""
        k = index.shape[1]
        sorted_expert, order = index.reshape(-1).sort(stable=True)
        token = order.div(k, rounding_mode="floor")
        offsets = group_ends(sorted_expert, self.num_experts)
        routed = x.index_select(0, token)
        if fused:
            hidden = gelu_times_up(grouped_matmul(routed, self.w_gate_up, offsets=offsets), self.expert_hidden)
        else:
            gate_h = grouped_matmul(routed, self.w_gate, offsets=offsets)
            hidden = F.gelu(gate_h) * grouped_matmul(routed, self.w_up, offsets=offsets)
        out = grouped_matmul(hidden, self.w_down, offsets=offsets) * gate.reshape(-1).index_select(0, order)[:, None]
        dst = x.new_zeros(x.shape) if base is None else base
        return dst.index_add_(0, token, out.to(dst.dtype))  # under autocast the two may differ

    def padded_experts(self, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """One bmm per weight over a zero-padded [E, capacity, D] buffer; capacity = this call's busiest
        expert, so no token is dropped. After one sort by expert, assignment number r of expert e goes to
        row e * capacity + r; each token's k results are gathered back and weighted by one small bmm."""
        num_tokens, k = index.shape
        sorted_expert, order = index.reshape(-1).sort(stable=True)
        # rank within its expert's group = position - first position of that expert
        rank = _group_ids(order.shape[0], x.device) - torch.searchsorted(sorted_expert, sorted_expert)
        capacity = int(rank.max()) + 1
        slot = rank.add_(sorted_expert, alpha=capacity)  # [N*k] rows of the buffer, all distinct
        token = order.div(k, rounding_mode="floor")
        buffer = x.new_zeros(self.num_experts * capacity, x.shape[1]).index_copy_(0, slot, x.index_select(0, token))
        gate_up = torch.bmm(buffer.view(self.num_experts, capacity, -1), self.w_gate_up)
        out = torch.bmm(gelu_times_up(gate_up, self.expert_hidden), self.w_down).view(-1, x.shape[1])
        slot_of_assignment = torch.empty_like(slot).index_copy_(0, order, slot)  # back to (token, j) order
        routed = out.index_select(0, slot_of_assignment).view(num_tokens, k, -1)
        return torch.bmm(gate.unsqueeze(1), routed).squeeze(1)  # sum_j gate[t, j] * routed[t, j]

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e alone on x [..., D] (reference path for tests and inspection)."""
        return (F.gelu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    @torch.no_grad()
    def keep_experts(self, keep: torch.Tensor) -> "MoEFeedForward":
        """A copy holding only experts `keep` (int ids, in order): same outputs as this layer with those
        experts unmasked and the rest masked."""
        keep = keep.to(torch.long)
        sub = MoEFeedForward(self.w_gate_up.shape[1], len(keep), self.expert_hidden, min(self.top_k, len(keep)),
                             0, self.router.balance_rate, self.dispatch)
        sub.w_gate_up.copy_(self.w_gate_up[keep])
        sub.w_down.copy_(self.w_down[keep])
        sub.router.proj.weight.copy_(self.router.proj.weight[keep])
        sub.router.expert_bias.copy_(self.router.expert_bias[keep])
        sub.router.gate_mass.copy_(self.router.gate_mass[keep])
        sub.shared = copy.deepcopy(self.shared)
        return sub
