"""Accuracy of the shapes-world alignment checker on ground-truth renders, clean and perturbed.

A checker that passes wrong images or fails right ones would make every alignment figure meaningless;
this measures how often it calls a correctly rendered scene correct ("all" attribute), per prompt kind.

    .venv/bin/python benchmarks/alignment_detector.py --n 1000
    .venv/bin/python benchmarks/alignment_detector.py --smoke      # seconds: 2 scenes per kind

Prints the table (the logged run is benchmarks/results/alignment_detector.txt); --out also writes the JSON there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from ernielab.worlds.alignment import check
from ernielab.worlds.shapes import KINDS, caption, render, sample_scene


def perturb(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float, shift: float) -> np.ndarray:
    x = image.astype(np.float64) / 255
    if blur:
        x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0))
    x = x + rng.normal(0, noise, x.shape) + rng.normal(0, shift, (1, 1, 3))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


CONDITIONS = {"clean": (0, 0, 0), "noise .05 + blur 0.7": (0.05, 0.7, 0), "noise .05 + blur 1.0": (0.05, 1.0, 0),
              "noise .05 + blur 1.0 + colour shift .03": (0.05, 1.0, 0.03)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="scenes per kind")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here (default: print only)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 scenes per kind")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(n=2)
        args = ap.parse_args(argv)
    table = {}
    for name, (noise, blur, shift) in CONDITIONS.items():
        row = {}
        for kind in KINDS:
            rng = np.random.default_rng(1234)
            ok = 0
            for _ in range(args.n):
                scene = sample_scene(rng, args.image_size, kind=kind)
                image = perturb(render(scene), rng, noise, blur, shift)
                ok += bool(check(caption(scene, rng), image)["all"])
            row[kind] = ok / args.n
        table[name] = row
        print(name, row, flush=True)
    report = json.dumps({"n_per_kind": args.n, "image_size": args.image_size, "all_correct": table,
                         "smoke": args.smoke}, indent=2)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
