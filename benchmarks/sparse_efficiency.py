"""Forward+backward time and peak memory of one attention sub-layer vs sequence length: HST vs dense.

Each (implementation, length) point runs in a fresh subprocess so allocations never leak between
points. The measured unit is what one transformer layer's attention costs in the model: pre-norm,
Q/K/V/out projections, attention and the residual, forward and backward (batch 1, fp32).

- dense:      `SparseSelfAttention.dense` with no padding: SDPA gets no mask, so the flash /
              memory-efficient kernel is eligible (on CPU the fused flash kernel never stores the n x n
              scores, so its memory is already linear; its time is quadratic)
- dense-masked: the same projections through SDPA with the additive float mask the dense path passed
              before 2026-12-04 (an explicit mask rules the flash kernel out on GPUs)
- dense-math: the same with SDPA forced to the unfused math kernel (explicit n x n scores, the textbook
              Transformer); skipped above --math-max-len to stay inside this machine's RAM
- hst:        `SparseSelfAttention.hierarchical` (representatives gather, tokens attend locally + reps)
- bigbird:    `SparseSelfAttention.bigbird` (window + random blocks + globals)
- hst-flex:   `SparseSelfAttention(attention_impl="flex").hierarchical`: HST's pattern as a FlexAttention
              BlockMask. On CUDA the compiled block-sparse kernel runs forward+backward; this torch
              build has no FlexAttention backward on the CPU, so there the point is forward only
              (under no_grad, "mode": "forward") and eager flex builds full scores: a check, not a speed.

--device cuda (the default when a GPU is present) times with CUDA events after synchronising and
reports torch.cuda.max_memory_allocated as the peak instead of RSS.

Peak memory: the worker resets the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs),
runs one forward+backward and reports VmHWM - VmRSS(before): the extra resident memory at the peak.
Time: the fastest of --repeats further iterations (wall clock, torch.set_num_threads(--threads)); the
minimum is the least disturbed by other processes on a shared machine. All timings are also saved.

    python benchmarks/sparse_efficiency.py --threads 1             # -> outputs/sparse_efficiency.json
    python benchmarks/sparse_efficiency.py --smoke                 # seconds: short lengths, small layer
                                                                   # -> outputs/smoke/sparse_efficiency.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path


def rss_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def worker(args) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ernielab.core.layers.norms import RMSNorm
    from ernielab.sparse.attention import SparseSelfAttention

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n, dim, g = args.length, args.dim, args.num_global
    impl = "flex" if args.impl == "hst-flex" else "sdpa"
    attn = SparseSelfAttention(dim, args.heads, args.block_size, window=1, num_random_blocks=args.random_blocks,
                               max_blocks=n // args.block_size, seed=0, attention_impl=impl).to(device)
    norm = RMSNorm(dim).to(device)
    backward = not (args.impl == "hst-flex" and not cuda)  # no FlexAttention backward on the CPU
    seq = torch.randn(1, n, dim, device=device, requires_grad=backward)
    reps = torch.randn(1, g, dim, device=device, requires_grad=backward)
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    full_valid = torch.ones(1, g + n, dtype=torch.bool, device=device)

    def step():
        if args.impl in ("dense", "dense-math"):
            out = seq + attn.dense(norm(seq), valid)
        elif args.impl == "dense-masked":
            q, k, v = attn.qkv(norm(seq))
            bias = torch.zeros(1, 1, 1, n, device=device)  # all-valid, but an explicit additive mask
            out = seq + attn.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        elif args.impl in ("hst", "hst-flex"):
            with contextlib.nullcontext() if backward else torch.no_grad():
                new_reps, out = attn.hierarchical(reps, seq, valid, norm)
            out = out + new_reps.sum() * 0
            if not backward:
                return
        elif args.impl == "bigbird":
            x = torch.cat([reps, seq], dim=1)
            out = x + attn.bigbird(norm(x), full_valid, g)
        else:
            raise ValueError(args.impl)
        out.square().mean().backward()
        seq.grad = reps.grad = None
        attn.zero_grad(set_to_none=True)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    backend = SDPBackend.MATH if args.impl == "dense-math" else None
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        if cuda:
            timed()  # compile (flex) and cuDNN / kernel selection outside the measurement
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before, _ = rss_kib()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
            except OSError:
                pass
        first = timed()
        peak_mib = ((torch.cuda.max_memory_allocated() - before) / 2**20 if cuda
                    else (rss_kib()[1] - before) / 1024)
        times = [timed() for _ in range(args.repeats)]
    return {"impl": args.impl, "length": n, "time_s": min(times) if times else first,
            "times_s": times, "first_s": first, "peak_mib": peak_mib, "threads": args.threads,
            "device": str(device), "mode": "forward+backward" if backward else "forward"}


def run_point(args, impl: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--length", str(length)]
    for key in ("threads", "dim", "heads", "block_size", "num_global", "random_blocks", "repeats", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"impl": impl, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], impls: list[str], lengths: list[int]) -> str:
    by = {(r["impl"], r["length"]): r for r in results}

    def cell(impl, n, key, fmt):
        r = by.get((impl, n))
        return fmt.format(r[key]) if r and key in r else "-"

    head = "| length | " + " | ".join(f"{i} time (s)" for i in impls) + " | " + \
           " | ".join(f"{i} peak (MiB)" for i in impls) + " | dense / hst time | dense / hst memory |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in lengths:
        d, h = by.get(("dense", n), {}), by.get(("hst", n), {})
        speed = f"{d['time_s'] / h['time_s']:.1f}x" if "time_s" in d and "time_s" in h else "-"
        mem = f"{d['peak_mib'] / h['peak_mib']:.1f}x" if "peak_mib" in d and "peak_mib" in h else "-"
        lines.append(f"| {n} | " + " | ".join(cell(i, n, "time_s", "{:.3f}") for i in impls) + " | " +
                     " | ".join(cell(i, n, "peak_mib", "{:.0f}") for i in impls) + f" | {speed} | {mem} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--impls", default="dense,dense-masked,hst,hst-flex,bigbird,dense-math")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--math-max-len", type=int, default=8192, help="skip dense-math (and CPU hst-flex: eager, full scores) above this length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-global", type=int, default=16, help="HST representatives / BigBird globals")
    p.add_argument("--random-blocks", type=int, default=3, help="BigBird random blocks per query block")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations after the measured first one")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: outputs/sparse_efficiency.json; with --smoke outputs/smoke/...)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: length 256, width 32, blocks of 32, one timed repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="hst", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.lengths, args.dim, args.heads, args.block_size, args.num_global, args.random_blocks, args.repeats = \
            "256", 32, 2, 32, 4, 1, 1
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out = args.out or Path("outputs/smoke/sparse_efficiency.json" if args.smoke else "outputs/sparse_efficiency.json")
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    results = []
    for n in lengths:
        for impl in impls:
            dense_scores = impl == "dense-math" or (impl == "hst-flex" and args.device == "cpu")
            if dense_scores and n > args.math_max_len:  # both build n x n scores
                continue
            r = run_point(args, impl, n)
            results.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(table(results, impls, lengths))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in
                                                 ("worker", "impl", "length", "out", "smoke")},
                                    "results": results}, indent=2, default=str) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
