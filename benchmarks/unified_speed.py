"""Decoding tokens/s of unified models, MoE dispatch variants side by side (target T2 of docs/unified.md).

Every (model, dispatch) variant is measured once per round, round-robin, and the best round is kept,
so that load from other processes hits all variants alike. "grouped" is the old dispatch (three
grouped_mm), "fused" the new default (gate|up fused, two grouped_mm), "padded" one bmm per weight over a
zero-padded buffer (see layers/moe.py).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/unified_speed.py \\
        --moe runs/unified/moe/model --dense runs/unified/dense/model --out runs/unified_3k/speed.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ernielab.models.unified import TextTokenizer, load_model
from ernielab.models.unified.evaluation import decoding_speed, heldout


def set_dispatch(model, mode: str) -> None:
    for _, moe in model.moe_layers():
        moe.dispatch = mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", type=Path, nargs="+", required=True, help="MoE model folders (full, sub-models)")
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--dispatch", type=lambda v: v.split(","), default=["grouped", "fused"])
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, vq, _ = load_model(args.dense)
    variants = {"dense": (dense, None)}
    for folder in args.moe:
        model = load_model(folder)[0]
        for mode in args.dispatch:
            variants[f"{folder.name}/{mode}"] = (model, mode)
    tok = TextTokenizer(dense.config.text_vocab)
    images, _ = heldout(max(args.batches), vq.config.image_size, seed=0)
    results: dict = {name: {} for name in variants}
    for batch in args.batches:
        for _ in range(args.rounds):
            for name, (model, mode) in variants.items():
                if mode is not None:
                    set_dispatch(model, mode)
                speed = decoding_speed(model, vq, tok, images, batch=batch, repeats=3)
                best = results[name].setdefault(str(batch), speed)
                for key in ("image_tokens_per_s", "text_tokens_per_s", "image_tokens_per_cpu_s",
                            "text_tokens_per_cpu_s"):
                    best[key] = max(best[key], speed[key])
    lines = ["| model / dispatch | batch | image tok/s | text tok/s | image vs dense | text vs dense | "
             "image vs dense, CPU time | text vs dense, CPU time |", "|---|---|---|---|---|---|---|---|"]
    for batch in map(str, args.batches):
        d = results["dense"][batch]
        for name, per_batch in results.items():
            r = per_batch[batch]
            ratio = {k: r[k] / d[k] for k in ("image_tokens_per_s", "text_tokens_per_s", "image_tokens_per_cpu_s",
                                              "text_tokens_per_cpu_s")}
            lines.append(f"| {name} | {batch} | {r['image_tokens_per_s']:.0f} | {r['text_tokens_per_s']:.0f} | "
                         f"{ratio['image_tokens_per_s']:.2f}x | {ratio['text_tokens_per_s']:.2f}x | "
                         f"{ratio['image_tokens_per_cpu_s']:.2f}x | {ratio['text_tokens_per_cpu_s']:.2f}x |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "table": lines, "rounds": args.rounds,
                                        "threads": args.threads}, indent=2) + "\n")


if __name__ == "__main__":
    main()
