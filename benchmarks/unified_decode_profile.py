"""Where a decoding step's time goes, MoE vs dense (docs/unified.md, "Where the MoE's extra time goes").

Both models decode as `decoding_speed` does (images one row per step, captions one token per step, KV
cache, greedy, no guidance) at one batch size, interleaved in one process. Reported per forward step:

1. whole decodes: wall and CPU ms per step (best of interleaved rounds);
2. in context, CPU ms per step spent in the feed-forward layers, in the rest of the blocks (norms,
   attention, KV cache), in the rest of the forward (embeddings, mask, RoPE, final norm) and outside the
   forward (heads, argmax, loop), timed with module hooks during whole decodes;
3. on an isolated layer, CPU ms per step (all layers summed) of each stage of the MoE layer on the real
   inputs the layers got in one decoding step (captured with a hook), next to the dense GeGLU on its own
   real inputs. Isolated stages run with hot caches, so their sum is below the in-context time;
4. torch.profiler: self CPU ms per step of the costliest ops and the number of ops per step (the
   profiler adds about 1 µs to every op, so it ranks ops; 1-3 are the timings).

`--moe-impl FILE` adds a third model to 1, 2 and 4, "moe_alt": the same MoE with its layers swapped for
`MoEFeedForward` from another copy of unified/moe.py (same weights), to profile an earlier implementation
against the current one in the same rounds, e.g. `git show HEAD:src/ernielab/unified/moe.py > /tmp/old.py`.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/unified_decode_profile.py \\
        --moe runs/unified_3k/moe/model --dense runs/unified_3k/dense/model --batch 8 \\
        --out runs/unified_3k/decode_profile_b8.json
    .venv/bin/python benchmarks/unified_decode_profile.py --smoke   # tiny random models: seconds

The report goes to --out (default outputs/unified_decode_profile.json; ..._smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from unified_speed import smoke_models, swap_moe_impl  # benchmarks/ is on the path when a script here runs

from ernielab.unified.evaluation import heldout
from ernielab.unified.generate import caption_codes, generate_image_codes
from ernielab.unified.io import load_model
from ernielab.unified.moe import MoEFeedForward, gelu_times_up, group_ends, grouped_matmul
from ernielab.unified.tokenizer import TextTokenizer
from ernielab.worlds.shapes import make_prompts

TASKS = ("image", "text")


def decoders(model, vq, tok, images: torch.Tensor, batch: int) -> dict:
    """task -> a closure decoding one batch and returning its number of forward steps."""
    prompts = [tok.encode(p) for p in make_prompts("single", batch, seed=1)]
    codes = vq.encode(images[:batch])
    return {"image": lambda: generate_image_codes(model, prompts, None, 1.0, 0.0)[1],
            "text": lambda: caption_codes(model, codes)[1]}


def step_times(runs: dict, rounds: int) -> dict:
    """'model/task' -> best wall and CPU ms per forward step over interleaved rounds."""
    steps = {key: fn() for key, fn in runs.items()}  # warm-up, and the step counts
    best: dict = {key: (float("inf"), float("inf")) for key in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
    return {f"{m}/{t}": {"wall_ms": 1e3 * w / steps[(m, t)], "cpu_ms": 1e3 * c / steps[(m, t)],
                         "steps": steps[(m, t)]} for (m, t), (w, c) in best.items()}


def in_context_split(models: dict, runs: dict, rounds: int) -> dict:
    """'model/task' -> CPU ms per forward step in the feed-forward layers, the rest of the blocks, the rest
    of the forward and outside the forward, during whole decodes (interleaved rounds, best by total)."""
    spent: dict = defaultdict(float)
    started: dict = {}

    def timed(module, key):
        pre = module.register_forward_pre_hook(lambda *_: started.__setitem__(key, time.thread_time_ns()))
        post = module.register_forward_hook(
            lambda *_: spent.__setitem__(key, spent[key] + time.thread_time_ns() - started[key]))
        return pre, post

    hooks = []
    for name, model in models.items():
        hooks += [h for b in model.blocks for m, part in ((b, "blocks"), (b.ffn, "ffn")) for h in timed(m, (name, part))]
        hooks += timed(model, (name, "forward"))
    best: dict = {}
    try:
        for _ in range(rounds):
            for (name, task), fn in runs.items():
                spent.clear()
                c0 = time.thread_time_ns()
                steps = fn()
                total = time.thread_time_ns() - c0
                ffn, blocks, forward = (spent[(name, part)] for part in ("ffn", "blocks", "forward"))
                split = {"feed-forward": ffn, "rest of the blocks": blocks - ffn, "rest of the forward": forward - blocks,
                         "outside the forward": total - forward, "total": total}
                split = {k: v / 1e6 / steps for k, v in split.items()}
                key = f"{name}/{task}"
                if key not in best or split["total"] < best[key]["total"]:
                    best[key] = split
    finally:
        for h in hooks:
            h.remove()
    return best


def ffn_inputs(model, fn, step: int) -> list[torch.Tensor]:
    """The flattened inputs every feed-forward layer got in decoding forward call number `step`."""
    seen: dict[int, list] = defaultdict(list)
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].detach().clone()))
             for i, b in enumerate(model.blocks)]
    fn()
    for h in hooks:
        h.remove()
    return [seen[i][step].reshape(-1, seen[i][step].shape[-1]) for i in sorted(seen)]


def moe_stages(moe: MoEFeedForward, x: torch.Tensor) -> dict:
    """The current inference path of the layer ("fused" dispatch, autograd off) cut into its stages:
    name -> closure (each reruns only its own stage)."""
    router, k, hidden = moe.router, moe.top_k, moe.expert_hidden
    sizes = [moe.num_experts, moe.shared.gate_proj.out_features, moe.shared.up_proj.out_features]
    weight = moe.input_projection()
    logits, shared_gate, shared_up = F.linear(x, weight).split(sizes, dim=1)
    shared_hidden = F.gelu(shared_gate) * shared_up
    shared = F.linear(shared_hidden, moe.shared.down_proj.weight)
    index, gate = router.route(logits)
    sorted_expert, order = index.reshape(-1).sort(stable=True)
    token = order.div(k, rounding_mode="floor")
    offsets = group_ends(sorted_expert, moe.num_experts)
    routed = x.index_select(0, token)
    gate_up = grouped_matmul(routed, moe.w_gate_up, offsets=offsets)
    h = gelu_times_up(gate_up, hidden)
    down = grouped_matmul(h, moe.w_down, offsets=offsets)
    out = down * gate.reshape(-1).index_select(0, order).unsqueeze(1)

    def sort_and_ends():
        s, o = index.reshape(-1).sort(stable=True)
        return o.div(k, rounding_mode="floor"), group_ends(s, moe.num_experts)

    return {
        "router + shared gate|up projection (one matmul)": lambda: F.linear(x, moe.input_projection()).split(sizes, 1),
        "top-k + gates": lambda: router.route(logits),
        "shared expert: gelu * up, down": lambda: F.linear(F.gelu(shared_gate) * shared_up,
                                                           moe.shared.down_proj.weight),
        "sort + group ends": sort_and_ends,
        "gather tokens": lambda: x.index_select(0, token),
        "grouped matmul gate|up": lambda: grouped_matmul(routed, moe.w_gate_up, offsets=offsets),
        "gelu * up": lambda: gelu_times_up(gate_up, hidden),
        "grouped matmul down": lambda: grouped_matmul(h, moe.w_down, offsets=offsets),
        "gate weighting": lambda: down * gate.reshape(-1).index_select(0, order).unsqueeze(1),
        "scatter-add onto shared": lambda: shared.clone().index_add_(0, token, out),
        "whole layer": lambda: moe(x),
    }


def dense_stages(ffn, x: torch.Tensor) -> dict:
    gate, up = ffn.gate_proj(x), ffn.up_proj(x)
    h = F.gelu(gate) * up
    return {"gate projection": lambda: ffn.gate_proj(x), "up projection": lambda: ffn.up_proj(x),
            "gelu * up": lambda: F.gelu(gate) * up, "down projection": lambda: ffn.down_proj(h),
            "whole layer": lambda: ffn(x)}


def stage_times(moe_model, dense_model, moe_x: list, dense_x: list, rounds: int, reps: int) -> dict:
    """'model: stage' -> best CPU ms per step (summed over layers), interleaved rounds."""
    calls: dict[str, list] = defaultdict(list)
    for block, x in zip(moe_model.blocks, moe_x):
        for name, fn in moe_stages(block.ffn, x).items():
            calls["moe: " + name].append(fn)
    for block, x in zip(dense_model.blocks, dense_x):
        for name, fn in dense_stages(block.ffn, x).items():
            calls["dense: " + name].append(fn)
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, fns in calls.items():
            c0 = time.thread_time()
            for _ in range(reps):
                for fn in fns:
                    fn()
            best[name] = min(best[name], (time.thread_time() - c0) / reps * 1e3)
    return best


def op_profile(fn, repeats: int, top: int) -> dict:
    """Self CPU ms per forward step of the `top` costliest ops, and ops per step."""
    steps = sum(fn() for _ in range(repeats))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {"self_ms_per_step_total": total / 1e3 / steps, "ops_per_step": sum(e.count for e in events) / steps,
            "top": {e.key: {"ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
                    for e in events[:top]}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", type=Path)
    ap.add_argument("--dense", type=Path)
    ap.add_argument("--moe-impl", type=Path, default=None, help="another copy of unified/moe.py to profile")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=100, help="repeats of each isolated stage per round")
    ap.add_argument("--step", type=int, default=3, help="which decoding forward call feeds the stages")
    ap.add_argument("--no-ops", action="store_true", help="skip the torch.profiler part")
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_decode_profile.json"), help="JSON report")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random models, batch 2, one round, no torch.profiler part (seconds)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
            moe, dense = smoke_models(Path(tmp))
            ap.set_defaults(moe=moe, dense=dense, batch=2, rounds=1, reps=2, step=1, no_ops=True,
                            out=Path("outputs/unified_decode_profile_smoke.json"))
            args = ap.parse_args(argv)
        if args.moe is None or args.dense is None:
            ap.error("--moe and --dense are required (or --smoke)")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    moe, vq, _ = load_model(args.moe)
    dense = load_model(args.dense)[0]
    tok = TextTokenizer(dense.config.text_vocab)
    images, _ = heldout(args.batch, vq.config.image_size, seed=0)
    models = {"moe": moe, "dense": dense}
    if args.moe_impl is not None:
        models["moe_alt"] = load_model(args.moe)[0]
        swap_moe_impl(models["moe_alt"], args.moe_impl)
    runs = {(m, t): fn for m, model in models.items() for t, fn in decoders(model, vq, tok, images, args.batch).items()}
    report: dict = {"batch": args.batch, "moe_alt_impl": None if args.moe_impl is None else str(args.moe_impl)}
    with torch.no_grad():
        report["steps"] = step_times(runs, args.rounds)
        report["in_context_cpu_ms_per_step"] = in_context_split(models, runs, args.rounds)
        report["isolated_cpu_ms_per_step"] = {}
        for task in TASKS:
            xs = {m: ffn_inputs(models[m], runs[(m, task)], args.step) for m in models}
            report["isolated_cpu_ms_per_step"][task] = {
                "tokens_per_call": xs["moe"][0].shape[0],
                **stage_times(moe, dense, xs["moe"], xs["dense"], args.rounds, args.reps)}
        if not args.no_ops:
            report["ops"] = {f"{m}/{t}": op_profile(fn, 2, 12) for (m, t), fn in runs.items()}
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
