"""Micro-benchmark of the MoE feed-forward dispatch modes against a dense GeGLU of the same active width.

Variants: "original" = the dispatch before this change (three grouped_mm over separate contiguous gate,
up and down weights; reproduced here), and the modes of unified/moe.py: "fused" = the torch dispatch
(gate|up fused: two grouped_mm), "grouped" = three grouped_mm over strided halves of the fused weight,
"padded" = one bmm per weight over a zero-padded [experts, capacity, dim] buffer, "kernel" = the fused C
kernel (unified/moe_kernel.py), "auto" = the default (the kernel here: inference, float32, CPU).

One layer of the docs/unified.md CPU model (dim 128, 16 GeGLU(64) experts, top-4, shared GeGLU(64)) and
the dense GeGLU(320) of the same active width, at several tokens per call. With --model the layer is a
trained one (layer --layer of that model) fed real hidden states of held-out sequences, so the routing
has the trained model's load imbalance; without it the layer is random (near-uniform routing).

Timings are CPU time of the benchmark thread, interleaved (every variant once per round, best round
kept) so that load from other processes on the machine hits all variants alike. The outputs of all
variants are checked to agree before timing.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/unified_moe_dispatch.py \\
        --model runs/unified/moe/model --out runs/unified_3k/dispatch.json
    .venv/bin/python benchmarks/unified_moe_dispatch.py --smoke   # 8 and 32 tokens, one short round: seconds

The report goes to --out (default outputs/unified_moe_dispatch.json; ..._smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ernielab.core.layers.mlp import GeGLU
from ernielab.unified.moe import MoEFeedForward, grouped_matmul


def trained_layer_and_states(model_dir: Path, layer: int, n: int) -> tuple[MoEFeedForward, torch.Tensor]:
    """The MoE layer `layer` of a trained model and n of the hidden states that reach it on held-out data."""
    from ernielab.unified.evaluation import heldout
    from ernielab.unified.io import load_model
    from ernielab.unified.sequences import collate, image_to_text_sequence, model_inputs, text_to_image_sequence
    from ernielab.unified.tokenizer import TextTokenizer

    model, vq, _ = load_model(model_dir)
    tok = TextTokenizer(model.config.text_vocab)
    images, captions = heldout(64, vq.config.image_size, seed=0)
    codes = vq.encode(images)
    seqs = [text_to_image_sequence(tok.encode(c), x) for c, x in zip(captions, codes)]
    seqs += [image_to_text_sequence(x, tok.encode(c)) for c, x in zip(captions, codes)]
    batch = collate(seqs)
    states = []
    moe = model.blocks[layer].ffn
    hook = moe.register_forward_hook(lambda mod, args, out: states.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(**model_inputs(batch))
    hook.remove()
    valid = batch["valid"].reshape(-1)
    pool = states[0][valid]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    pick = pick.repeat(n // len(pool) + 1)[:n]  # more tokens than states: repeat them
    return moe, pool[pick].contiguous()


def original_experts(moe: MoEFeedForward, w_gate: torch.Tensor, w_up: torch.Tensor, x: torch.Tensor,
                     index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The dispatch as it was before this change, with its separate contiguous gate and up weights (the
    "grouped" mode reads strided halves of the fused weight instead, which is a little slower)."""
    k = index.shape[1]
    flat_expert = index.reshape(-1)
    order = flat_expert.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat_expert, minlength=moe.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    routed = x[token]
    hidden = F.gelu(grouped_matmul(routed, w_gate, counts, offsets)) * grouped_matmul(routed, w_up, counts, offsets)
    out = grouped_matmul(hidden, moe.w_down, counts, offsets) * gate.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, out)


def original_layer(moe: MoEFeedForward, w_gate: torch.Tensor, w_up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    index, gate = moe.router(x)
    return original_experts(moe, w_gate, w_up, x, index, gate) + moe.shared(x)


def best_time(fn, reps: int) -> float:
    """CPU seconds of this thread per call: steadier than wall time when another process shares the core."""
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) / reps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a trained unified MoE model folder")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=[8, 32, 128, 512, 2048])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=4000, help="timed calls per variant and round: budget / tokens")
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_moe_dispatch.json"), help="JSON report")
    ap.add_argument("--smoke", action="store_true", help="8 and 32 tokens, one round, few calls (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(tokens=[8, 32], rounds=1, budget=64, out=Path("outputs/unified_moe_dispatch_smoke.json"))
        args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model is not None:
        moe, states = trained_layer_and_states(args.model, args.layer, max(args.tokens))
    else:
        moe, states = MoEFeedForward(128, 16, 64, 4, 64), torch.randn(max(args.tokens), 128)
    moe.eval()
    dim, active = moe.w_gate.shape[1], moe.top_k * moe.expert_hidden + (moe.shared.up_proj.out_features
                                                                        if moe.shared is not None else 0)
    dense = GeGLU(dim, active).eval()
    rows = []
    with torch.no_grad():
        for n in args.tokens:
            x = states[:n]
            index, gate = moe.router(x)
            counts = torch.bincount(index.reshape(-1), minlength=moe.num_experts)
            moe.dispatch = "grouped"
            reference = moe.experts(x, index, gate)
            for mode in ("fused", "padded", "kernel"):
                moe.dispatch = mode
                torch.testing.assert_close(moe.experts(x, index, gate), reference, atol=1e-4, rtol=1e-4)
            variants = {}
            for mode in MoEFeedForward.DISPATCH_MODES:
                variants[f"experts_{mode}"] = lambda m=mode: (setattr(moe, "dispatch", m), moe.experts(x, index, gate))
                variants[f"layer_{mode}"] = lambda m=mode: (setattr(moe, "dispatch", m), moe(x))
            w_gate, w_up = moe.w_gate.detach().contiguous(), moe.w_up.detach().contiguous()
            torch.testing.assert_close(original_experts(moe, w_gate, w_up, x, index, gate), reference,
                                       atol=1e-4, rtol=1e-4)
            variants["experts_original"] = lambda: original_experts(moe, w_gate, w_up, x, index, gate)
            variants["layer_original"] = lambda: original_layer(moe, w_gate, w_up, x)
            variants["dense_geglu"] = lambda: dense(x)
            reps = max(3, args.budget // n)
            best = {name: float("inf") for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    fn()  # warm-up
                    best[name] = min(best[name], best_time(fn, reps))
            used = int((counts > 0).sum())
            row = {"tokens": n, "assignments": index.numel(), "capacity": int(counts.max()), "experts_used": used,
                   "padding": int(counts.max()) * used / index.numel(), **{k: v * 1e6 for k, v in best.items()}}
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    lines = ["| tokens per call | routed experts (µs): original / fused / padded bmm (padded rows per "
             "assignment) / C kernel | whole MoE layer (µs): original / fused / auto | dense GeGLU (µs) | "
             "layer / dense: original / fused / auto |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['experts_original']:.0f} / {r['experts_fused']:.0f} / "
                     f"{r['experts_padded']:.0f} ({r['padding']:.2f}) / {r['experts_kernel']:.0f} | "
                     f"{r['layer_original']:.0f} / {r['layer_fused']:.0f} / {r['layer_auto']:.0f} | "
                     f"{r['dense_geglu']:.0f} | " + " / ".join(f"{r[f'layer_{m}'] / r['dense_geglu']:.2f}x"
                                                           for m in ("original", "fused", "auto")) + " |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "table": lines, "model": str(args.model), "layer": args.layer,
                                    "threads": args.threads, "rounds": args.rounds}, indent=2) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
