"""Decoding tokens/s of unified models, MoE dispatch variants side by side (target T2 of docs/unified.md).

Every (model, dispatch) variant is measured once per round, round-robin, so that load from other
processes hits all variants alike. Two summaries, each for wall-clock and for CPU time of the decoding
thread: the best round of every variant (as in earlier rounds), and the median over rounds of the
variant / dense ratio *within* a round (steadier when another process comes and goes on the core).
"auto" is the default (the fused C kernel for small inference calls, unified/moe_kernel.py), "fused" the
torch dispatch (gate|up fused, two grouped_mm), "grouped" the older one (three grouped_mm), "padded" one bmm
per weight over a zero-padded buffer (see unified/moe.py).

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/unified_speed.py \\
        --moe runs/unified_3k/moe/model --dense runs/unified_3k/dense/model --dispatch fused,auto \\
        --rounds 7 --out runs/unified_3k/speed_kernel.json
    .venv/bin/python benchmarks/unified_speed.py --smoke      # tiny random models, one round: seconds

The report goes to --out (default outputs/unified_speed.json; outputs/unified_speed_smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ernielab.unified.evaluation import decoding_speed, heldout
from ernielab.unified.io import load_model
from ernielab.unified.tokenizer import TextTokenizer

SPEEDS = ("image_tokens_per_s", "text_tokens_per_s", "image_tokens_per_cpu_s", "text_tokens_per_cpu_s")


def smoke_models(root: Path) -> tuple[Path, Path]:
    """A tiny random MoE (4 layers, 8 experts, k=2) and its dense twin with a tiny random VQ, saved as model
    folders under root: what the --smoke modes of the unified benchmarks run (the numbers mean nothing)."""
    from ernielab.unified.config import UnifiedConfig, VQConfig
    from ernielab.unified.io import save_model
    from ernielab.unified.model import UnifiedTransformer
    from ernielab.unified.tokenizer import build_text_vocab
    from ernielab.unified.vq import VQTokenizer

    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny()).eval()
    cfg = UnifiedConfig.tiny(text_vocab=build_text_vocab(), num_layers=4)
    moe = save_model(root / "moe" / "model", UnifiedTransformer(cfg), vq, {"smoke": True})
    dense = save_model(root / "dense" / "model", UnifiedTransformer(cfg.dense_twin()), vq, {"smoke": True})
    return moe, dense


def swap_moe_impl(model, path: Path) -> None:
    """Replace every MoE layer by the MoEFeedForward of another copy of unified/moe.py, same weights."""
    spec = importlib.util.spec_from_file_location("ernielab.unified._moe_alt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = model.config
    for block in model.blocks:
        alt = module.MoEFeedForward(cfg.dim, cfg.num_experts, cfg.expert_hidden, cfg.top_k, cfg.shared_hidden,
                                    cfg.balance_rate)
        alt.load_state_dict(block.ffn.state_dict())
        block.ffn = alt.eval()


def set_dispatch(model, mode: str) -> None:
    for _, moe in model.moe_layers():
        moe.dispatch = mode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", type=Path, nargs="+", help="MoE model folders (full, sub-models)")
    ap.add_argument("--dense", type=Path)
    ap.add_argument("--dispatch", type=lambda v: v.split(","), default=["fused", "auto"])
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per variant and round (best kept)")
    ap.add_argument("--moe-impl", type=Path, default=None,
                    help="also run the first MoE with the layer of this copy of unified/moe.py (variant 'alt')")
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_speed.json"), help="JSON report")
    ap.add_argument("--smoke", action="store_true", help="tiny random models, batch 2, one round (seconds)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
            moe, dense = smoke_models(Path(tmp))
            ap.set_defaults(moe=[moe], dense=dense, batches=[2], rounds=1, repeats=1,
                            out=Path("outputs/unified_speed_smoke.json"))
            args = ap.parse_args(argv)
        if not args.moe or args.dense is None:
            ap.error("--moe and --dense are required (or --smoke)")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dense, vq, _ = load_model(args.dense)
    variants = {"dense": (dense, None)}
    for folder in args.moe:
        model = load_model(folder)[0]
        for mode in args.dispatch:
            variants[f"{folder.name}/{mode}"] = (model, mode)
    if args.moe_impl is not None:
        alt = load_model(args.moe[0])[0]
        swap_moe_impl(alt, args.moe_impl)
        variants[f"{args.moe[0].name}/alt"] = (alt, None)  # its own default dispatch
    tok = TextTokenizer(dense.config.text_vocab)
    images, _ = heldout(max(args.batches), vq.config.image_size, seed=0)
    results: dict = {name: {} for name in variants}
    for batch in args.batches:
        for _ in range(args.rounds):
            for name, (model, mode) in variants.items():
                if mode is not None:
                    set_dispatch(model, mode)
                speed = decoding_speed(model, vq, tok, images, batch=batch, repeats=args.repeats)
                entry = results[name].setdefault(str(batch), {**speed, "rounds": []})
                entry["rounds"].append({key: speed[key] for key in SPEEDS})
                for key in SPEEDS:
                    entry[key] = max(entry[key], speed[key])
    lines = ["| model / dispatch | batch | image tok/s | text tok/s | image vs dense | text vs dense | "
             "image vs dense, CPU time | text vs dense, CPU time |", "|---|---|---|---|---|---|---|---|"]
    for batch in map(str, args.batches):
        d = results["dense"][batch]
        for name, per_batch in results.items():
            r = per_batch[batch]
            r["ratio_best"] = {k: r[k] / d[k] for k in SPEEDS}
            r["ratio_median"] = {k: statistics.median(own[k] / ref[k] for own, ref in zip(r["rounds"], d["rounds"]))
                                 for k in SPEEDS}
            best, med = r["ratio_best"], r["ratio_median"]
            lines.append(f"| {name} | {batch} | {r['image_tokens_per_s']:.0f} | {r['text_tokens_per_s']:.0f} | "
                         + " | ".join(f"{best[k]:.2f}x (median {med[k]:.2f}x)" for k in SPEEDS) + " |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "table": lines, "rounds": args.rounds,
                                    "repeats": args.repeats, "threads": args.threads,
                                    "alt_impl": str(args.moe_impl)}, indent=2) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
