"""The docs/unified.md table: elastic MoE super-model, extracted sub-models and the dense baseline.

Trains (or reuses, when finished runs exist under --out) the VQ tokenizer, the elastic MoE model and the
dense baseline with the same active parameters and training budget; extracts each sub-model as a
standalone checkpoint, loads it back and evaluates it without retraining; then measures decoding
speed round-robin (every model once per round, best round kept) so that load from other processes on
the machine hits all models alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unified_table.py --out runs/unified
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernielab.models.unified import UnifiedConfig, VQConfig, extract_submodel, load_model, parameter_counts, save_model
from ernielab.models.unified.evaluation import decoding_speed, evaluate, heldout
from ernielab.models.unified.submodel import describe_submodel, submodel_summary
from ernielab.models.unified.tokenizer import TextTokenizer
from ernielab.training.unified import UnifiedTrainConfig, VQTrainConfig, train_unified, train_vq


def ensure_trained(out: Path, steps: int, progress: bool) -> None:
    if not (out / "vq" / "vq.safetensors").is_file():
        train_vq(VQConfig.cpu(), VQTrainConfig(), out / "vq", progress=progress)
    for name, cfg, elastic in (("moe", UnifiedConfig.cpu(), True), ("dense", UnifiedConfig.cpu().dense_twin(), False)):
        if not (out / name / "model" / "model.safetensors").is_file():
            train_unified(cfg, UnifiedTrainConfig(steps=steps, elastic=elastic), out / "vq", out / name,
                          progress=progress)


def submodel_rows(cfg: UnifiedConfig) -> list[tuple[str, dict]]:
    k, depth, experts = cfg.top_k, round(0.75 * cfg.num_layers), cfg.num_experts // 2
    return [
        ("MoE, full", {}),
        (f"top-k halved (k={k // 2})", {"top_k": k // 2}),
        (f"top-k quartered (k={max(1, k // 4)})", {"top_k": max(1, k // 4)}),
        (f"75% depth ({depth} layers)", {"depth": depth}),
        (f"50% experts ({experts})", {"num_experts": experts}),
        (f"combined: {depth} layers, {experts} experts, k={k // 2}",
         {"depth": depth, "num_experts": experts, "top_k": k // 2}),
        (f"combined: {depth} layers, {experts} experts, k={max(1, k // 4)}",
         {"depth": depth, "num_experts": experts, "top_k": max(1, k // 4)}),
    ]


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/unified"))
    ap.add_argument("--steps", type=int, default=UnifiedTrainConfig().steps)
    ap.add_argument("--n-text", type=int, default=500)
    ap.add_argument("--n-caption", type=int, default=300)
    ap.add_argument("--per-kind", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--sample-top-k", type=int, default=3)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--speed-batches", type=lambda v: [int(b) for b in v.split(",")], default=[8, 32],
                    help="decoding batch sizes for tokens/s (comma-separated); the table shows the first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ensure_trained(args.out, args.steps, not args.no_progress)

    moe, vq, _ = load_model(args.out / "moe" / "model")
    models = {}
    for name, spec in submodel_rows(moe.config):
        folder = args.out / "sub" / name.split(" (")[0].replace(" ", "_").replace(",", "").replace(":", "")
        sub = describe_submodel(moe, **spec)
        small = extract_submodel(moe, sub)
        save_model(folder, small, vq, {"source": str(args.out / "moe" / "model"), "submodel": submodel_summary(sub)})
        models[name] = (load_model(folder)[0], spec)  # evaluated as the standalone checkpoint
    dense, _, _ = load_model(args.out / "dense" / "model")
    models["dense baseline (same active params)"] = (dense, {})

    results = {}
    settings = dict(n_text=args.n_text, n_caption=args.n_caption, per_kind=args.per_kind, guidance=args.guidance,
                    temperature=args.temperature, top_k=args.sample_top_k)
    for name, (model, spec) in models.items():
        report = evaluate(model, vq, speed=False, **settings)
        results[name] = {"spec": spec, "params": parameter_counts(model), **report}
        print(f"{name}: ppl {report['text_perplexity']:.3f} caption {report['caption']['accuracy']:.3f} "
              f"image {report['image_alignment']['all']:.3f}", flush=True)

    tok = TextTokenizer(moe.config.text_vocab)
    images, _ = heldout(max(args.speed_batches), vq.config.image_size, seed=0)
    for batch in args.speed_batches:
        for _ in range(args.speed_rounds):
            for name, (model, _) in models.items():
                speed = decoding_speed(model, vq, tok, images, batch=batch, repeats=3)
                best = results[name].setdefault("speed", {}).setdefault(str(batch), speed)
                for key in ("image_tokens_per_s", "text_tokens_per_s"):
                    best[key] = max(best[key], speed[key])

    full = results["MoE, full"]
    dense_name = "dense baseline (same active params)"
    b0 = str(args.speed_batches[0])
    lines = ["| model | active params | total params | text ppl | caption acc | image align (all) | "
             f"image tok/s (batch {b0}) | text tok/s (batch {b0}) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = r["caption"]["accuracy"] / max(full["caption"]["accuracy"], 1e-9)
        speed = r["speed"][b0]
        lines.append(
            f"| {name} | {r['params']['active'] / 1e6:.3f}M ({r['params']['active'] / full['params']['active']:.0%})"
            f" | {r['params']['total'] / 1e6:.3f}M | {fmt(r['text_perplexity'])} | {fmt(r['caption']['accuracy'])}"
            f" ({rel:.0%}) | {fmt(r['image_alignment']['all'])} | {speed['image_tokens_per_s']:.0f} | "
            f"{speed['text_tokens_per_s']:.0f} |")
    ratios = {}
    lines += ["", "| decoding batch | MoE / dense, image tokens/s | MoE / dense, text tokens/s | "
              "k=1 sub-model / full MoE, image tokens/s |", "|---|---|---|---|"]
    quarter = next(n for n in results if n.startswith("top-k quartered"))
    for batch in map(str, args.speed_batches):
        f, d, q = full["speed"][batch], results[dense_name]["speed"][batch], results[quarter]["speed"][batch]
        ratios[batch] = {"image": f["image_tokens_per_s"] / d["image_tokens_per_s"],
                         "text": f["text_tokens_per_s"] / d["text_tokens_per_s"],
                         "k1_over_full_image": q["image_tokens_per_s"] / f["image_tokens_per_s"]}
        lines.append(f"| {batch} | {ratios[batch]['image']:.2f}x | {ratios[batch]['text']:.2f}x | "
                     f"{ratios[batch]['k1_over_full_image']:.2f}x |")
    routing = full["routing"]
    lines += ["", "| routing (full MoE, held-out sequences) | max/mean expert load | load entropy |", "|---|---|---|"]
    for modality in ("text", "image", "all"):
        lines.append(f"| {modality} tokens | {routing[modality]['max_over_mean']:.2f} | "
                     f"{routing[modality]['entropy']:.3f} |")
    lines.append(f"\nCosine similarity of the text and image expert-load vectors (mean over layers): "
                 f"{routing['text_image_cosine']:.2f}.")
    table = "\n".join(lines)
    results["_meta"] = {"settings": settings, "steps": args.steps, "speed_rounds": args.speed_rounds,
                        "speed_batches": args.speed_batches, "threads": args.threads, "speed_ratios": ratios,
                        "elapsed_s": time.time() - t0}
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table)


if __name__ == "__main__":
    main()
