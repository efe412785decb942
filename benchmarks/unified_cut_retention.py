"""How much of the full model's caption accuracy an elastic cut keeps, with a paired confidence interval.

For each model folder, the full model and the cut (default: 3 layers, 8 experts, k=1, the 51% cut)
caption the same held-out val images (items 0..N-1, the images `ernielab unified eval` reads). The
retention is accuracy(cut) / accuracy(full). Its 95% interval comes from a paired bootstrap over
images: both models' outcomes on one image are resampled together, so the noise they share (hard
images) cancels, which an interval from two independent accuracies would not allow for.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 taskset -c 0 .venv/bin/python benchmarks/unified_cut_retention.py \\
        runs/unified_6k_anchor/moe/model runs/unified_6k/moe/model --n-caption 2000 --out retention.json
    .venv/bin/python benchmarks/unified_cut_retention.py --smoke   # a tiny random model, 4 images: seconds

The report goes to --out (default outputs/unified_cut_retention.json; ..._smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unified_speed import smoke_models  # benchmarks/ is on the path when a script here runs

from ernielab.unified.evaluation import caption_accuracy, heldout
from ernielab.unified.io import load_model
from ernielab.unified.submodel import describe_submodel
from ernielab.unified.tokenizer import TextTokenizer


def paired_bootstrap(full: np.ndarray, cut: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """95% interval of mean(cut) / mean(full) with images resampled in pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(full), size=(rounds, len(full)))
    ratios = cut[idx].mean(1) / np.maximum(full[idx].mean(1), 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def retention(folder: Path, n: int, depth: int, experts: int, top_k: int, rounds: int) -> dict:
    model, vq, _ = load_model(folder)
    tok = TextTokenizer(model.config.text_vocab)
    images, _ = heldout(n, vq.config.image_size)
    sub = describe_submodel(model, depth=depth, num_experts=experts, top_k=top_k)
    full = np.array(caption_accuracy(model, vq, tok, images, per_item=True)["correct"], dtype=float)
    cut = np.array(caption_accuracy(model, vq, tok, images, sub, per_item=True)["correct"], dtype=float)
    low, high = paired_bootstrap(full, cut, rounds, seed=0)
    return {"model": str(folder), "n": n, "cut": {"depth": depth, "experts": experts, "top_k": top_k},
            "full": full.mean(), "cut_accuracy": cut.mean(),
            "retention": cut.mean() / full.mean() if full.mean() > 0 else float("nan"),
            "retention_95ci": [low, high],
            "only_full_right": int(((full == 1) & (cut == 0)).sum()),
            "only_cut_right": int(((full == 0) & (cut == 1)).sum())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="model folders (RUN_DIR/model)")
    ap.add_argument("--n-caption", type=int, default=2000)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=5000, help="bootstrap rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_cut_retention.json"), help="JSON report")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model (8 experts), 4 images (seconds)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
            ap.set_defaults(n_caption=4, experts=4, bootstrap=20, out=Path("outputs/unified_cut_retention_smoke.json"))
            args = ap.parse_args(argv)
            args.models = args.models or [smoke_models(Path(tmp))[0]]
        if not args.models:
            ap.error("give model folders (or --smoke)")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows = []
    for folder in args.models:
        t0 = time.time()
        row = retention(folder, args.n_caption, args.depth, args.experts, args.top_k, args.bootstrap)
        row["seconds"] = time.time() - t0
        rows.append(row)
        low, high = row["retention_95ci"]
        print(f"{folder}: full {row['full']:.3f}, cut {row['cut_accuracy']:.3f}, keeps {100 * row['retention']:.1f}% "
              f"(95% CI {100 * low:.1f}-{100 * high:.1f}%; only full right {row['only_full_right']}, only cut "
              f"right {row['only_cut_right']}; {row['seconds']:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
