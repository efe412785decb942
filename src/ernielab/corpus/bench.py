"""Timings of each `ernielab data` step per 1,000 images, on MNIST digits written out as PNG files.

    OMP_NUM_THREADS=1 .venv/bin/python -m ernielab.corpus.bench --n 5000     # the run in docs/corpus.md
    .venv/bin/python -m ernielab.corpus.bench --smoke                         # seconds

Writes outputs/corpus_benchmark/timings.json (or --out). The shipped Inception scorer is timed on
--n-inception images (it dominates); the other steps on all --n.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> dict:
    from ernielab.aesthetic.scorer import AestheticConfig, AestheticScorer
    from ernielab.corpus import steps
    from ernielab.corpus.manifest import read_manifest, write_manifest
    from ernielab.worlds.mnist import _mnist_arrays

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--n-inception", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="default outputs/corpus_benchmark[_smoke]")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.n_inception = 100, 0
    if args.out is None:
        args.out = Path("outputs/corpus_benchmark_smoke" if args.smoke else "outputs/corpus_benchmark")
    torch.set_num_threads(1)
    out = args.out
    folder = out / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    pixels, _ = _mnist_arrays()
    for i in range(args.n):
        Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8), "L").save(folder / f"{i:05d}.png")
    manifest = out / "corpus.parquet"
    manifest.unlink(missing_ok=True)
    scorer = out / "pixels_scorer"
    AestheticScorer(AestheticConfig(backbone="pixels:8", feature_dim=192, hidden=0)).save_pretrained(scorer)

    timings: dict[str, float] = {}

    def timed(name, fn, n=args.n):
        start = time.perf_counter()
        result = fn()
        timings[name] = round((time.perf_counter() - start) / n * 1000, 3)
        return result

    timed("scan (sha256, decode, size)", lambda: steps.scan(str(folder), manifest, progress=False))
    dd = timed("dedupe (256-bit pHash + colour, greedy marking)", lambda: steps.dedupe(manifest, progress=False))
    timed("categorize: digits (shipped CNN)", lambda: steps.categorize(manifest, "digits", progress=False))
    timed("caption: digits, 3 levels (CNN once per level)", lambda: steps.caption(manifest, "digits", progress=False))
    timed("score: pixels:8 head", lambda: steps.score(manifest, scorer, progress=False))
    if args.n_inception:
        sub = out / "sub.parquet"
        rows = read_manifest(manifest)[: args.n_inception]
        write_manifest(rows, sub)
        timed("score: shipped Inception scorer", lambda: steps.score(sub, None, redo=True, progress=False),
              args.n_inception)
    timed("sample: build sampler + draw 1,000 per 1,000 rows",
          lambda: steps.sample(manifest, out / "sample.json", args.n))
    report = {"n_images": args.n, "n_inception": args.n_inception, "duplicates_found": dd["duplicates"],
              "seconds_per_1000_images": timings, "threads": 1, "machine": platform.processor() or platform.machine()}
    (out / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
