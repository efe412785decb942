"""One GPU, one command: the unified family's MoE layer and ERNIE-Sparse's HST attention against their dense
counterparts, in bf16. Written for one H200 (about 7 minutes); `--smoke` runs every code path at toy sizes on
the CPU in seconds.

Sections (each point's result, error or "skipped" lands in the JSON, rewritten after every point, so a killed
run keeps what it measured):

- `moe_check`: every dispatch mode (fused, grouped, padded, gpu; gpu also with groups unpadded and with
  K-major weights) against an fp32 per-expert loop on the same routing, forward and gradients (input, gates,
  both expert weights): relative errors in bf16 (next to the reference dispatch's own bf16 error) and, with
  TF32 off, in fp32. On CUDA also whether one training step of each mode synchronises with the host
  (`torch.cuda.set_sync_debug_mode("error")`).
- `moe`: the MoE layer (--experts experts of width --expert-hidden, top --top-k, a shared expert of width
  --shared-hidden) against a dense GeGLU of the same active width (top_k * expert_hidden + shared_hidden),
  at each --moe-tokens: forward (inference: eval, no autograd) and forward+backward (training: the router's
  load statistics included), eager for every mode, then torch.compile (dynamic shapes: one compile per
  variant and pass) for the dense layer and the modes in --compile-modes order while the budget lasts.
  `moe/dense` is the MoE's tokens/s over the dense layer's (same pass, same eager/compiled): the target
  is >= 0.7 from 8K tokens.
- `hst_check`: HST through FlexAttention block masks (`attention_impl="flex"`, compiled on CUDA) against the
  HST reference path (gathered blocks through SDPA), forward and (on CUDA) gradients, in bf16, next to an
  fp32 run of the reference.
- `hst`: one attention sub-layer (pre-norm, Q/K/V/out projections, attention, residual) at each
  --hst-lengths, forward and forward+backward: dense with SDPA's flash kernel (no mask), HST via flex
  (block masks built in the call, as the model does), HST via gathered blocks; and the attention kernels
  alone (flash on q, k, v vs HST's two flex calls on prebuilt masks). The target is HST-flex faster than
  flash from 8K tokens. The CPU has no FlexAttention backward: there flex points are forward only.

Timing: CUDA events around --reps back-to-back calls (no host sync between them, so launch overhead overlaps
the GPU's work as in a training loop), best of --rounds rounds, after the first call and --warmup more (the
first call's time, compilation included, is saved as `first_s`). perf_counter on the CPU.
--budget-s (default 400) sets section deadlines (moe_check 8%, moe to 58%, hst_check to 65%, hst to 100%);
a point or compile that would start past its deadline is recorded as skipped, so the command ends in about
7 minutes on one H200 even when compiles run long.

    python benchmarks/gpu_moe_hst.py --out outputs/gpu_moe_hst.json        # one H200 (see docs/unified-log.md)
    python benchmarks/gpu_moe_hst.py --smoke                               # CPU, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ernielab.core.layers.mlp import GeGLU
from ernielab.core.layers.norms import RMSNorm
from ernielab.sparse.attention import (
    SparseSelfAttention,
    flex_attention_call,
    hst_broadcast_block_mask,
    hst_gather_block_mask,
)
from ernielab.unified.moe import MoEFeedForward

SECTIONS = ("moe_check", "moe", "hst_check", "hst")
DEADLINES = {"moe_check": 0.08, "moe": 0.58, "hst_check": 0.65, "hst": 1.0}  # cumulative shares of --budget-s
MOE_MODES = ("fused", "grouped", "padded", "gpu", "gpu_align1", "gpu_kmajor")  # gpu_*: variants of "gpu"
COMPILE_SECONDS = 45  # a compile is not started with less than this left in its section


# ---- timing, budget, report ------------------------------------------------------------------------------------
class Bench:
    """Device, clock, section deadlines and the JSON report (rewritten after every point)."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "environment": environment(self.device), "sections": {}}

    def left(self, section: str) -> float:
        """Seconds until the section's deadline."""
        return self.start + DEADLINES[section] * self.args.budget_s - time.perf_counter()

    def add(self, section: str, row: dict) -> None:
        self.report["sections"].setdefault(section, []).append(row)
        print(json.dumps({"section": section, **row}, default=str), flush=True)
        self.save()

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_calls(self, fn, reps: int) -> tuple[float, float]:
        """(first call's seconds, compilation included; best mean seconds per call over --rounds rounds of
        `reps` calls, after --warmup more calls)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(self.args.warmup):  # allocator and autotuning settle
            fn()
        rounds = []
        for _ in range(self.args.rounds):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    fn()
                end.record()
                end.synchronize()
                rounds.append(start.elapsed_time(end) / 1000 / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                rounds.append((time.perf_counter() - t0) / reps)
        return first, min(rounds)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "grouped_mm": hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def error_row(exc: BaseException) -> dict:
    lines = traceback.format_exception_only(type(exc), exc)
    return {"error": " ".join(line.strip() for line in lines)[:500]}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


# ---- MoE layer ---------------------------------------------------------------------------------------------------
def build_moe(args, device, dtype) -> MoEFeedForward:
    torch.manual_seed(0)
    moe = MoEFeedForward(args.dim, args.experts, args.expert_hidden, args.top_k, args.shared_hidden)
    torch.nn.init.normal_(moe.router.proj.weight, std=args.dim ** -0.5)
    return moe.to(device=device, dtype=dtype)


def moe_variant(base: MoEFeedForward, mode: str) -> MoEFeedForward:
    """A copy of the layer set up for `mode`: a dispatch mode, or gpu_align1 (groups unpadded) and gpu_kmajor
    (expert weights stored column-major: the same values, the layout grouped GEMM kernels read as K-major)."""
    moe = copy.deepcopy(base)
    moe.dispatch = "gpu" if mode.startswith("gpu") else mode
    if mode == "gpu_align1":
        moe.gpu_group_align = 1
    if mode == "gpu_kmajor":
        with torch.no_grad():
            for w in (moe.w_gate_up, moe.w_down):
                w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)
    return moe


def dense_twin(args, device, dtype) -> GeGLU:
    torch.manual_seed(1)
    return GeGLU(args.dim, args.top_k * args.expert_hidden + args.shared_hidden).to(device=device, dtype=dtype)


def reference_experts(x, index, gate, w_gate_up, w_down) -> torch.Tensor:
    """sum_j gate[:, j] * expert_{index[:, j]}(x), one expert at a time (host syncs allowed: a reference)."""
    hidden = w_down.shape[1]
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        rows, slots = (index == e).nonzero(as_tuple=True)
        if rows.numel():
            h = x[rows] @ w_gate_up[e]
            y = (F.gelu(h[:, :hidden]) * h[:, hidden:]) @ w_down[e]
            out = out.index_add(0, rows, gate[rows, slots, None] * y)
    return out


def experts_and_grads(fn, x, gate, weights, dy):
    x, gate = x.detach().requires_grad_(), gate.detach().requires_grad_()
    out = fn(x, gate)
    grads = torch.autograd.grad(out, (x, gate, *weights), dy)
    return [out.detach(), *grads]


def moe_check(bench: Bench, args) -> None:
    names = ("out", "grad_x", "grad_gate", "grad_w_gate_up", "grad_w_down")
    n = args.check_tokens
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares true fp32 products
    for dtype in (torch.bfloat16, torch.float32):
        dtype_name = str(dtype).replace("torch.", "")
        if bench.left("moe_check") < 0:
            bench.add("moe_check", {"dtype": dtype_name, "skipped": "budget"})
            continue
        base = build_moe(args, bench.device, dtype)
        gen = torch.Generator(device=bench.device).manual_seed(0)
        x = torch.randn(n, args.dim, device=bench.device, generator=gen).to(dtype)
        with torch.no_grad():
            index, gate = base.router(x)  # one routing for all: modes differ in dispatch only
        dy = torch.randn(n, args.dim, device=bench.device, generator=gen).to(dtype)
        w32 = [w.detach().float().requires_grad_() for w in (base.w_gate_up, base.w_down)]
        ref = experts_and_grads(lambda xx, gg: reference_experts(xx, index, gg, *w32), x.float(), gate.float(),
                                w32, dy.float())
        for mode in MOE_MODES:
            try:
                moe = moe_variant(base, mode)
                got = experts_and_grads(lambda xx, gg: moe.experts(xx, index, gg), x, gate,
                                        (moe.w_gate_up, moe.w_down), dy)
                row = {"dtype": dtype_name, "mode": mode, "tokens": n,
                       **{f"rel_err_{k}": relative_error(a, b) for k, a, b in zip(names, got, ref)}}
            except Exception as exc:  # noqa: BLE001 - every mode reports, the run goes on
                row = {"dtype": dtype_name, "mode": mode, **error_row(exc)}
            bench.add("moe_check", row)
    rows = bench.report["sections"].get("moe_check", [])
    bf16 = {r["mode"]: r for r in rows if r.get("dtype") == "bfloat16" and "rel_err_out" in r}
    if "fused" in bf16:  # bf16 noise of the reference dispatch: the bar every mode is held to
        for r in rows:
            if r.get("dtype") == "bfloat16" and "rel_err_out" in r:
                r["within_2x_fused_bf16_error"] = all(
                    r[f"rel_err_{k}"] <= 2 * bf16["fused"][f"rel_err_{k}"] + 1e-3 for k in names)
    if bench.cuda:
        host_sync_check(bench, args)
    bench.save()


def host_sync_check(bench: Bench, args) -> None:
    """One training step of each mode under torch.cuda.set_sync_debug_mode('error'): None = no host sync."""
    base = build_moe(args, bench.device, torch.bfloat16).train()
    x = torch.randn(args.check_tokens, args.dim, device=bench.device, dtype=torch.bfloat16)
    for mode in MOE_MODES:
        moe = moe_variant(base, mode)
        out = moe(x)  # warm-up outside the check: lazy inits and caches may sync once
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            out = moe(x)
            out.backward(torch.ones_like(out))
            result = None
        except RuntimeError as exc:
            result = str(exc).splitlines()[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        bench.add("moe_check", {"mode": mode, "host_sync_in_training_step": result})


def moe_bench(bench: Bench, args) -> None:
    dtype = torch.bfloat16
    base = build_moe(args, bench.device, dtype)
    variants = {"dense": dense_twin(args, bench.device, dtype)}
    variants.update({mode: moe_variant(base, mode) for mode in MOE_MODES})
    tokens = args.moe_tokens
    xs = {n: torch.randn(n, args.dim, device=bench.device, dtype=dtype) for n in tokens}
    dys = {n: torch.randn(n, args.dim, device=bench.device, dtype=dtype) for n in tokens}

    def point(name, layer, n, passes, compiled):
        if bench.left("moe") < 0:
            bench.add("moe", {"variant": name, "tokens": n, "pass": passes, "compiled": compiled, "skipped": "budget"})
            return
        x, dy = xs[n], dys[n]
        module = variants[name]
        if passes == "forward":
            module.eval()

            def fn():
                with torch.no_grad():
                    layer(x)
        else:
            module.train()
            xg = x.detach().requires_grad_()
            params = list(module.parameters())

            def fn():
                for p in params:
                    p.grad = None
                layer(xg).backward(dy)
        try:
            first, best = bench.time_calls(fn, args.reps)
            row = {"time_ms": best * 1e3, "tokens_per_s": n / best, "first_s": first}
        except Exception as exc:  # noqa: BLE001
            row = error_row(exc)
        bench.add("moe", {"variant": name, "tokens": n, "pass": passes, "compiled": compiled, **row})

    for passes in ("forward", "forward+backward"):
        for n in tokens:
            for name, module in variants.items():
                point(name, module, n, passes, False)
    for name in ("dense", *args.compile_modes):
        if bench.left("moe") < COMPILE_SECONDS:
            bench.add("moe", {"variant": name, "compiled": True, "skipped": "budget (compile not started)"})
            continue
        torch._dynamo.reset()
        compiled = torch.compile(variants[name], dynamic=True, backend=args.compile_backend)
        for passes in ("forward", "forward+backward"):
            for n in tokens:
                point(name, compiled, n, passes, True)  # first_s of a pass's first size: its compile
    add_moe_ratios(bench)


def add_moe_ratios(bench: Bench) -> None:
    """moe/dense (tokens/s ratio) beside every timed MoE point, and a summary of the best mode per size."""
    rows = [r for r in bench.report["sections"].get("moe", []) if "time_ms" in r]
    dense = {(r["tokens"], r["pass"], r["compiled"]): r["time_ms"] for r in rows if r["variant"] == "dense"}
    summary = []
    for r in rows:
        key = (r["tokens"], r["pass"], r["compiled"])
        if r["variant"] != "dense" and key in dense:
            r["moe_over_dense"] = dense[key] / r["time_ms"]
    for key in sorted({(r["tokens"], r["pass"]) for r in rows}):
        moe = [r for r in rows if (r["tokens"], r["pass"]) == key and r["variant"] != "dense"]
        best_dense = min((r["time_ms"] for r in rows if (r["tokens"], r["pass"]) == key and r["variant"] == "dense"),
                         default=None)
        if moe and best_dense:
            top = min(moe, key=lambda r: r["time_ms"])
            summary.append({"tokens": key[0], "pass": key[1], "best_moe": top["variant"],
                            "best_moe_compiled": top["compiled"], "best_moe_ms": top["time_ms"],
                            "best_dense_ms": best_dense, "best_moe_over_best_dense": best_dense / top["time_ms"]})
    bench.report["moe_summary"] = summary
    bench.save()


# ---- HST attention ---------------------------------------------------------------------------------------------
def hst_layers(args, device, dtype):
    """(flex HST, gathered-blocks HST, norm): the same weights, two attention paths."""
    torch.manual_seed(0)
    n_max = max(args.hst_lengths + [args.hst_check_length])
    common = dict(window=1, max_blocks=n_max // args.block_size, seed=0)
    flex = SparseSelfAttention(args.hst_dim, args.heads, args.block_size, attention_impl="flex", **common)
    sdpa = SparseSelfAttention(args.hst_dim, args.heads, args.block_size, attention_impl="sdpa", **common)
    sdpa.load_state_dict(flex.state_dict())
    norm = RMSNorm(args.hst_dim)
    return flex.to(device, dtype), sdpa.to(device, dtype), norm.to(device, dtype)


def hst_inputs(args, n, device, dtype, grad):
    gen = torch.Generator(device=device).manual_seed(n)
    seq = torch.randn(1, n, args.hst_dim, device=device, generator=gen).to(dtype).requires_grad_(grad)
    reps = torch.randn(1, args.num_global, args.hst_dim, device=device, generator=gen).to(dtype).requires_grad_(grad)
    return seq, reps, torch.ones(1, n, dtype=torch.bool, device=device)


def hst_check(bench: Bench, args) -> None:
    n = args.hst_check_length
    outs = {}
    for name, dtype in (("flex", torch.bfloat16), ("sdpa", torch.bfloat16), ("sdpa", torch.float32)):
        flex, sdpa, norm = hst_layers(args, bench.device, dtype)
        layer = flex if name == "flex" else sdpa
        grad = bench.cuda or name == "sdpa"  # no FlexAttention backward on the CPU
        seq, reps, valid = hst_inputs(args, n, bench.device, dtype, grad)
        try:
            with contextlib.nullcontext() if grad else torch.no_grad():
                new_reps, new_seq = layer.hierarchical(reps, seq, valid, norm)
                result = [new_seq.detach(), new_reps.detach()]
                if grad:
                    gen = torch.Generator(device=bench.device).manual_seed(1)  # the same weights for every run
                    g = torch.randn(new_seq.shape, device=bench.device, generator=gen).to(dtype)
                    result += list(torch.autograd.grad((new_seq * g).sum() + new_reps.float().sum(),
                                                       (seq, reps, layer.to_q.weight)))
            outs[(name, dtype)] = result
        except Exception as exc:  # noqa: BLE001
            bench.add("hst_check", {"impl": name, "dtype": str(dtype), **error_row(exc)})
    names = ("seq", "reps", "grad_seq", "grad_reps", "grad_q_weight")
    ref = outs.get(("sdpa", torch.float32))
    errors = {impl: {f"rel_err_{k}": relative_error(a, b) for k, a, b in zip(names, outs[(impl, torch.bfloat16)], ref)}
              for impl in ("flex", "sdpa") if ref is not None and (impl, torch.bfloat16) in outs}
    for impl, row in errors.items():
        if "sdpa" in errors:  # bf16 noise of the reference path: the bar flex is held to
            row["within_2x_sdpa_bf16_error"] = all(v <= 2 * errors["sdpa"][k] + 1e-3 for k, v in row.items())
        bench.add("hst_check", {"impl": impl, "dtype": "bfloat16", "length": n, "against": "sdpa float32", **row})


def hst_bench(bench: Bench, args) -> None:
    dtype = torch.bfloat16
    flex, sdpa, norm = hst_layers(args, bench.device, dtype)
    heads, head_dim = args.heads, args.hst_dim // args.heads
    flash = contextlib.nullcontext
    if bench.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731 - the no-mask dense path, flash only

    for n in args.hst_lengths:
        for passes in ("forward", "forward+backward"):
            grad = passes != "forward"
            seq, reps, valid = hst_inputs(args, n, bench.device, dtype, grad)
            q, k, v = (torch.randn(1, heads, n, head_dim, device=bench.device, dtype=dtype, requires_grad=grad)
                       for _ in range(3))
            g = args.num_global
            qr, kr, vr = (torch.randn(1, heads, g, head_dim, device=bench.device, dtype=dtype, requires_grad=grad)
                          for _ in range(3))
            sparse_block = math.lcm(args.block_size, 128) if bench.cuda else args.block_size
            masks = (hst_gather_block_mask(valid, g, args.block_size, flex.segment_len(n // args.block_size, g)),
                     hst_broadcast_block_mask(valid, g, args.block_size, 1, sparse_block))

            leaves = (seq, reps, q, k, v, qr, kr, vr, *flex.parameters(), *sdpa.parameters(), *norm.parameters())

            def run(out_fn):
                def fn():
                    with contextlib.nullcontext() if grad else torch.no_grad():
                        out = out_fn()
                        if grad:
                            for t in leaves:  # gradients are written, not accumulated, as in a training step
                                t.grad = None
                            out.backward(torch.ones_like(out))
                return fn

            def dense_layer():
                with flash():
                    return seq + sdpa.dense(norm(seq), valid)

            def hst_layer(layer):
                def fn():
                    new_reps, new_seq = layer.hierarchical(reps, seq, valid, norm)
                    return new_seq + new_reps.sum() * 0
                return fn

            def flash_kernel():
                with flash():
                    return F.scaled_dot_product_attention(q, k, v)

            def flex_kernels():  # keys laid out [sequence; representatives], as in the layer
                keys, values = torch.cat([k, kr], 2), torch.cat([v, vr], 2)
                gathered = flex_attention_call(qr, keys, values, masks[0])
                return flex_attention_call(q, keys, values, masks[1]) + gathered.sum() * 0

            impls = {"dense_flash_layer": dense_layer, "hst_flex_layer": hst_layer(flex),
                     "hst_sdpa_layer": hst_layer(sdpa), "flash_kernel": flash_kernel, "hst_flex_kernels": flex_kernels}
            for name, out_fn in impls.items():
                if grad and not bench.cuda and "flex" in name:
                    bench.add("hst", {"impl": name, "length": n, "pass": passes,
                                      "skipped": "no FlexAttention backward on the CPU"})
                    continue
                if bench.left("hst") < 0:
                    bench.add("hst", {"impl": name, "length": n, "pass": passes, "skipped": "budget"})
                    continue
                try:
                    first, best = bench.time_calls(run(out_fn), args.reps)
                    row = {"time_ms": best * 1e3, "first_s": first}
                except Exception as exc:  # noqa: BLE001
                    row = error_row(exc)
                bench.add("hst", {"impl": name, "length": n, "pass": passes, **row})
    add_hst_ratios(bench)


def add_hst_ratios(bench: Bench) -> None:
    rows = [r for r in bench.report["sections"].get("hst", []) if "time_ms" in r]
    by = {(r["impl"], r["length"], r["pass"]): r["time_ms"] for r in rows}
    summary = []
    for n, passes in sorted({(r["length"], r["pass"]) for r in rows}):
        entry = {"length": n, "pass": passes}
        for sparse, dense in (("hst_flex_layer", "dense_flash_layer"), ("hst_sdpa_layer", "dense_flash_layer"),
                              ("hst_flex_kernels", "flash_kernel")):
            if (sparse, n, passes) in by and (dense, n, passes) in by:
                entry[f"{dense}_over_{sparse}"] = by[(dense, n, passes)] / by[(sparse, n, passes)]
        summary.append(entry)
    bench.report["hst_summary"] = summary  # > 1: HST faster than flash
    bench.save()


# ---- main --------------------------------------------------------------------------------------------------------
def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--reps", type=int, default=10, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per point: the best one counts")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--expert-hidden", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--shared-hidden", type=int, default=512)
    ap.add_argument("--moe-tokens", type=ints, default=[8192, 16384, 32768, 65536])
    ap.add_argument("--check-tokens", type=int, default=4096)
    ap.add_argument("--compile-modes", type=lambda v: v.split(",") if v else [], default=["gpu", "fused", "gpu_align1"],
                    help="MoE variants compiled after the dense layer, in this order, while the budget lasts")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--hst-dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--num-global", type=int, default=16, help="HST representatives")
    ap.add_argument("--hst-lengths", type=ints, default=[8192, 65536, 16384, 4096], help="in order of priority")
    ap.add_argument("--hst-check-length", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_moe_hst.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, seconds: every code path once")
    args = ap.parse_args(argv)
    if args.smoke:  # smoke sizes become the defaults; options given explicitly still win
        ap.set_defaults(device="cpu", budget_s=600.0, reps=1, rounds=1, warmup=0, dim=32, experts=8,
                        expert_hidden=16, top_k=2, shared_hidden=16, moe_tokens=[64], check_tokens=48,
                        compile_modes=["gpu"],
                        compile_backend="aot_eager", hst_dim=32, heads=2, block_size=16, num_global=4,
                        hst_lengths=[128], hst_check_length=128, out=Path("outputs/gpu_moe_hst_smoke.json"))
        args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    # flex recompiles per length and per grad mode; past the default limit it would fall back to eager (n x n)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}):
        report = run_sections(args)
    torch._dynamo.reset()
    return report


def run_sections(args) -> dict:
    bench = Bench(args)
    runners = {"moe_check": moe_check, "moe": moe_bench, "hst_check": hst_check, "hst": hst_bench}
    for section in args.sections:
        print(f"== {section} ({bench.left(section):.0f} s to its deadline)", flush=True)
        try:
            runners[section](bench, args)
        except Exception as exc:  # noqa: BLE001 - a broken section is reported; the others still run
            bench.add(section, {"section_failed": True, **error_row(exc)})
            traceback.print_exc()
    for key in ("moe_summary", "hst_summary"):
        for row in bench.report.get(key, []):
            print(key, json.dumps(row), flush=True)
    bench.save()
    print(f"report: {args.out} ({bench.report['elapsed_s']} s)")
    return bench.report


if __name__ == "__main__":
    main()
