"""The docs/unified.md table: elastic MoE super-model, extracted sub-models and the dense baseline.

Trains (or reuses, when finished runs exist under --out) the VQ tokenizer, the elastic MoE model and the
dense baseline with the same active parameters and training budget; extracts each sub-model as a
standalone checkpoint, loads it back and evaluates it without retraining; then measures decoding
speed round-robin (every model once per round, best round kept) so that load from other processes on
the machine hits all models alike.

Sub-models are extracted twice where a choice exists: by the default rule (evenly spaced layers,
experts by training gate mass) and "val-selected" (layers / experts chosen by held-out loss on val
items the evaluation never reads, `unified/selection.py`), once per --select-tasks objective:
by default the loss of all three tasks, and the caption (image->caption) loss alone.
The full MoE's speed is also measured with the torch "fused" dispatch (grouped_mm) instead of the
default "auto" one (the fused C kernel at decoding sizes) for comparison.

The runs are described by training configs: --config (the MoE, default configs/unified/moe.json, with
--set overrides) and --vq-config; the dense baseline is the MoE config with its model's dense twin (same
active width, not elastic). Runs go to OUT/vq, OUT/moe and OUT/dense whatever the configs' folders.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unified_table.py --out runs/unified_6k_anchor \
        --config configs/unified/anchor_6k.json --n-caption 1000 --select-tasks ''
    .venv/bin/python benchmarks/unified_table.py --smoke          # tiny models, a few seconds
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernielab.core.cli import load_config
from ernielab.unified.config import UnifiedConfig
from ernielab.unified.evaluation import decoding_speed, evaluate, heldout
from ernielab.unified.io import load_model, save_model
from ernielab.unified.model import parameter_counts
from ernielab.unified.selection import select_submodel
from ernielab.unified.submodel import describe_submodel, extract_submodel, half_active_cut, submodel_summary
from ernielab.unified.tokenizer import TextTokenizer
from ernielab.unified.train import UnifiedTrainConfig, VQTrainConfig, train_unified, train_vq

TORCH_DISPATCH = "MoE, full, torch grouped_mm dispatch (speed only)"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "unified"
SMOKE = dict(config=CONFIGS / "tiny.json", vq_config=CONFIGS / "vq_tiny.json", out=Path("outputs/unified_table_smoke"),
             n_text=4, n_caption=2, per_kind=1, speed_rounds=1, speed_batches=[2], select_tasks=[("i2t",)],
             select_n=2)


def ensure_trained(out: Path, moe_cfg: UnifiedTrainConfig, vq_cfg: VQTrainConfig,
                   progress: bool) -> dict[str, UnifiedTrainConfig | VQTrainConfig]:
    """Train what is missing under OUT: the VQ, the MoE and its dense twin (same settings otherwise)."""
    vq_cfg = vq_cfg.replace(output_dir=str(out / "vq"))
    if not (out / "vq" / "vq.safetensors").is_file():
        train_vq(vq_cfg, progress)
    moe_cfg = moe_cfg.replace(output_dir=str(out / "moe"), vq_dir=vq_cfg.output_dir)
    dense_cfg = moe_cfg.replace(output_dir=str(out / "dense"), model=moe_cfg.model.dense_twin())
    for cfg in (moe_cfg, dense_cfg):
        if not (Path(cfg.output_dir) / "model" / "model.safetensors").is_file():
            train_unified(cfg, progress)
    return {"vq": vq_cfg, "moe": moe_cfg, "dense": dense_cfg}


def submodel_rows(cfg: UnifiedConfig) -> list[tuple[str, dict]]:
    k = cfg.top_k
    depth, experts, quarter_k = half_active_cut(cfg)  # the cut anchor draws train
    return [
        ("MoE, full", {}),
        (f"top-k halved (k={k // 2})", {"top_k": k // 2}),
        (f"top-k quartered (k={quarter_k})", {"top_k": quarter_k}),
        (f"75% depth ({depth} layers)", {"depth": depth}),
        (f"50% experts ({experts})", {"num_experts": experts}),
        (f"combined: {depth} layers, {experts} experts, k={k // 2}",
         {"depth": depth, "num_experts": experts, "top_k": k // 2}),
        (f"combined: {depth} layers, {experts} experts, k={quarter_k}",
         {"depth": depth, "num_experts": experts, "top_k": quarter_k}),
    ]


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def image_score(report: dict) -> float | None:
    """The checker's "all" score, or None when image generation was skipped (--per-kind 0)."""
    return (report.get("image_alignment") or {}).get("all")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_table"),
                    help="run folders (vq, moe, dense, sub) and the report (table.md, results.json)")
    ap.add_argument("--config", type=Path, default=CONFIGS / "moe.json", help="the MoE's training config")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="override a field of --config, e.g. --set steps=3000 (repeatable)")
    ap.add_argument("--vq-config", type=Path, default=CONFIGS / "vq.json", help="the VQ's training config")
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
    ap.add_argument("--select-tasks", default="t2i,i2t,text;i2t",
                    type=lambda v: [tuple(t.split(",")) for t in v.split(";") if t],
                    help="val-selected rows: ';'-separated task lists whose summed loss picks layers / experts "
                         "('' = no such rows)")
    ap.add_argument("--select-n", type=int, default=64, help="val items per task in the selection set")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny configs, a few held-out items, one speed round (seconds; to OUT default "
                         "outputs/unified_table_smoke)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    configs = ensure_trained(args.out, load_config(UnifiedTrainConfig, args.config, args.sets),
                             load_config(VQTrainConfig, args.vq_config), not args.no_progress)

    moe, vq, _ = load_model(args.out / "moe" / "model")
    models, selections = {}, {}
    for name, spec in submodel_rows(moe.config):
        choices = [(name, describe_submodel(moe, **spec), None)]
        for tasks in (args.select_tasks if "depth" in spec or "num_experts" in spec else []):
            t_sel = time.time()
            sub, report = select_submodel(moe, vq, spec.get("depth"), spec.get("num_experts"), spec.get("top_k"),
                                          n=args.select_n, tasks=tasks)
            report["seconds"] = time.time() - t_sel
            choices.append((f"{name}, val-selected on {'+'.join(tasks)} loss", sub, report))
        for row_name, sub, report in choices:
            summary = submodel_summary(sub)
            if report is not None and summary == submodel_summary(choices[0][1]):
                selections[row_name] = {"same_as_default": True, "submodel": summary, **report}
                continue  # the selection kept the default choice: nothing new to evaluate
            folder = args.out / "sub" / name.split(" (")[0].replace(" ", "_").replace(",", "").replace(":", "")
            if report is not None:
                folder = folder.with_name(f"{folder.name}_val-{'+'.join(report['selection_set']['tasks'])}")
            small = extract_submodel(moe, sub)
            save_model(folder, small, vq, {"source": str(args.out / "moe" / "model"), "submodel": summary,
                                           "selection": report})
            models[row_name] = (load_model(folder)[0], spec)  # evaluated as the standalone checkpoint
            if report is not None:
                selections[row_name] = {"same_as_default": False, "submodel": summary, **report}
    dense, _, _ = load_model(args.out / "dense" / "model")
    models["dense baseline (same active params)"] = (dense, {})

    results = {}
    settings = dict(n_text=args.n_text, n_caption=args.n_caption, per_kind=args.per_kind, guidance=args.guidance,
                    temperature=args.temperature, top_k=args.sample_top_k)
    for name, (model, spec) in models.items():
        report = evaluate(model, vq, speed=False, **settings)
        results[name] = {"spec": spec, "params": parameter_counts(model), **report}
        print(f"{name}: ppl {report['text_perplexity']:.3f} caption {report['caption']['accuracy']:.3f} "
              f"image {fmt(image_score(report))}", flush=True)

    tok = TextTokenizer(moe.config.text_vocab)
    images, _ = heldout(max(args.speed_batches), vq.config.image_size, seed=0)
    variants = [(name, model, None) for name, (model, _) in models.items()]
    variants.append((TORCH_DISPATCH, models["MoE, full"][0], "fused"))
    results[TORCH_DISPATCH] = {}
    for batch in args.speed_batches:
        for _ in range(args.speed_rounds):
            for name, model, dispatch in variants:
                for _, layer in model.moe_layers():
                    layer.dispatch = dispatch or "auto"
                speed = decoding_speed(model, vq, tok, images, batch=batch, repeats=3)
                best = results[name].setdefault("speed", {}).setdefault(str(batch), speed)
                for key in ("image_tokens_per_s", "text_tokens_per_s", "image_tokens_per_cpu_s",
                            "text_tokens_per_cpu_s"):
                    best[key] = max(best[key], speed[key])
        for _, layer in models["MoE, full"][0].moe_layers():
            layer.dispatch = "auto"

    full = results["MoE, full"]
    dense_name = "dense baseline (same active params)"
    b0 = str(args.speed_batches[0])
    lines = ["| model | active params | total params | text ppl | caption acc | image align (all) | "
             f"image tok/s (batch {b0}) | text tok/s (batch {b0}) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == TORCH_DISPATCH:
            continue
        rel = r["caption"]["accuracy"] / max(full["caption"]["accuracy"], 1e-9)
        speed = r["speed"][b0]
        lines.append(
            f"| {name} | {r['params']['active'] / 1e6:.3f}M ({r['params']['active'] / full['params']['active']:.0%})"
            f" | {r['params']['total'] / 1e6:.3f}M | {fmt(r['text_perplexity'])} | {fmt(r['caption']['accuracy'])}"
            f" ({rel:.0%}) | {fmt(image_score(r))} | {speed['image_tokens_per_s']:.0f} | "
            f"{speed['text_tokens_per_s']:.0f} |")
    ratios = {}
    lines += ["", "| decoding batch | clock | MoE / dense, image tokens/s | MoE / dense, text tokens/s | "
              "same, torch grouped_mm dispatch (image / text) | k=1 sub-model / full MoE, image tokens/s |",
              "|---|---|---|---|---|---|"]
    quarter = next(n for n in results if n.startswith("top-k quartered"))
    for batch in map(str, args.speed_batches):
        f, d, q = full["speed"][batch], results[dense_name]["speed"][batch], results[quarter]["speed"][batch]
        o = results[TORCH_DISPATCH]["speed"][batch]
        ratios[batch] = {}
        for clock, per in (("wall", "s"), ("cpu", "cpu_s")):
            img, txt = f"image_tokens_per_{per}", f"text_tokens_per_{per}"
            r = {"image": f[img] / d[img], "text": f[txt] / d[txt], "torch_dispatch_image": o[img] / d[img],
                 "torch_dispatch_text": o[txt] / d[txt], "k1_over_full_image": q[img] / f[img]}
            ratios[batch][clock] = r
            lines.append(f"| {batch} | {clock} | {r['image']:.2f}x | {r['text']:.2f}x | "
                         f"{r['torch_dispatch_image']:.2f}x / {r['torch_dispatch_text']:.2f}x | "
                         f"{r['k1_over_full_image']:.2f}x |")
    routing = full["routing"]
    lines += ["", "| routing (full MoE, held-out sequences) | max/mean expert load | load entropy |", "|---|---|---|"]
    for modality in ("text", "image", "all"):
        lines.append(f"| {modality} tokens | {routing[modality]['max_over_mean']:.2f} | "
                     f"{routing[modality]['entropy']:.3f} |")
    lines.append(f"\nCosine similarity of the text and image expert-load vectors (mean over layers): "
                 f"{routing['text_image_cosine']:.2f}.")
    for name, sel in selections.items():
        chosen = "the default choice" if sel["same_as_default"] else "its own row above"
        lines.append(f"\n{name}: layers {sel['submodel']['layers']}, held-out selection loss {sel['loss']:.4f}, "
                     f"{sel['seconds']:.0f} s; {chosen}.")
    table = "\n".join(lines)
    results["_selections"] = selections
    results["_meta"] = {"settings": settings, "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
                        "speed_rounds": args.speed_rounds,
                        "speed_batches": args.speed_batches, "threads": args.threads, "speed_ratios": ratios,
                        "elapsed_s": time.time() - t0}
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table)


if __name__ == "__main__":
    main()
