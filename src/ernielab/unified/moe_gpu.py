"""The "gpu" dispatch of the routed experts: sorted once, grouped matmuls, no host synchronisation.

What a GPU wants from the MoE layer, and how this path gives it:
- no host synchronisation on the hot path: every size is known from the input's shape (no `.item()`,
  `.tolist()`, `nonzero` or capacity read back), so the host queues kernels ahead of the GPU, CUDA graphs
  can capture the layer and torch.compile traces it without graph breaks;
- one stable sort of the (token, expert) assignments by expert; group ends by one `searchsorted`;
- `grouped_mm` over expert groups (gate|up fused in one call, then down), in bf16 on CUDA. Each group is
  padded with zero rows to a multiple of `align` rows, so every group starts on an aligned row (the
  alignment grouped-GEMM kernels ask of jagged operands; `align=1` pads nothing). The buffer has a fixed
  N*k + E*(align-1) rows and the last group absorbs the slack: grouped_mm leaves rows past its last offset
  uninitialised (NaN, seen on the CPU), zero rows give exact zeros forward and backward;
- the gate weights the hidden rows (width H) before the down projection, not the output rows (width D),
  so the weighting is folded into the gelu * up elementwise work;
- no atomics in the forward: tokens enter the buffer by an index_put (each row written once) and leave by
  a gather of their k rows and a sum over k. The backward of the entry is that same gather + sum, the
  backward of the exit writes each row once, so the gradients need no colliding atomic adds either.

Where grouped_mm cannot run (an older torch without it, float32 on CUDA, strides that are not multiples of
16 bytes) `moe.grouped_matmul` falls back to one matmul per expert, which reads the group sizes back to
the host: that fallback is for correctness checks and the CPU, not for speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rows per expert group on CUDA: 16 rows keep every group's first row 16-byte aligned for any element size
# and width (what grouped GEMM kernels ask of the jagged dimension; torchtitan pads token groups likewise)
GPU_GROUP_ALIGN = 16


def padded_layout(sorted_expert: torch.Tensor, num_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of the padded expert buffer for assignments sorted by expert.

    sorted_expert [M] ascending expert ids -> (row of each sorted assignment [M] int64, int32 end row of every
    group [E], buffer rows). Group e starts at a multiple of `align`; the last group ends at the buffer's end.
    """
    m = sorted_expert.shape[0]
    experts = torch.arange(num_experts, device=sorted_expert.device)
    ends = torch.searchsorted(sorted_expert, experts, right=True)  # int64 [E]
    position = torch.arange(m, device=sorted_expert.device)
    if align == 1:
        return position, ends.to(torch.int32), m
    counts = ends.diff(prepend=ends.new_zeros(1))
    padded_ends = ((counts + align - 1) // align * align).cumsum(0)
    rows = m + num_experts * (align - 1)  # a fixed bound on the padded total: no size read back
    shift = (padded_ends - padded_ends.diff(prepend=ends.new_zeros(1))) - (ends - counts)  # padded start - start
    padded_ends[-1] = rows
    return position + shift.index_select(0, sorted_expert), padded_ends.to(torch.int32), rows


def sorted_grouped_experts(x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, w_gate_up: torch.Tensor,
                           w_down: torch.Tensor, grouped_matmul, align: int = GPU_GROUP_ALIGN,
                           base: torch.Tensor | None = None) -> torch.Tensor:
    """base + sum_j gate[:, j] * expert_{index[:, j]}(x) for x [N, D], index and gate [N, k].

    `grouped_matmul(x, weight, offsets=...)` is the grouped product (moe.grouped_matmul); w_gate_up [E, D, 2H]
    holds gate and up fused (gate first), w_down [E, H, D].
    """
    num_tokens, k = index.shape
    num_experts, hidden = w_gate_up.shape[0], w_down.shape[1]
    sorted_expert, order = index.reshape(-1).sort(stable=True)
    sorted_row, offsets, rows = padded_layout(sorted_expert, num_experts, align)
    row = torch.empty_like(sorted_row).scatter_(0, order, sorted_row).view(num_tokens, k)  # (token, j) -> row
    # tokens into their rows: a write per row; its backward gathers each token's k rows and sums them
    routed = x.new_zeros(rows, x.shape[1]).index_put((row,), x.unsqueeze(1).expand(-1, k, -1))
    row_gate = gate.new_zeros(rows).index_put((row,), gate)  # padding rows get gate 0
    gate_up = grouped_matmul(routed, w_gate_up, offsets=offsets)
    weighted = F.gelu(gate_up[:, :hidden]) * gate_up[:, hidden:] * row_gate.unsqueeze(1).to(gate_up.dtype)
    out_rows = grouped_matmul(weighted, w_down, offsets=offsets)
    out = out_rows.index_select(0, row.reshape(-1)).view(num_tokens, k, out_rows.shape[1]).sum(1)
    return out if base is None else base + out.to(base.dtype)
