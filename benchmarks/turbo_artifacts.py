"""Where a distilled student's FID goes: simple pixel statistics of real, teacher and student images.

The shapes world draws flat shapes on an exactly black background, so faint noise ("grain") left in an
image shows up as mid-tone pixels and a raised background level, which Inception features pick up.
Every model draws the same held-out captions with the same seeds as benchmarks/turbo.py.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/turbo_artifacts.py --teacher runs/default_v1 \
        --student dmd_reg=runs/distill/dmd_reg/student --n 200     # -> outputs/turbo/artifacts.json
    .venv/bin/python benchmarks/turbo_artifacts.py --smoke      # seconds: tiny random teacher and student, 2 images

With --smoke, a tiny random teacher (unless --teacher) and student (unless --student) stand in for trained models
(turbo.smoke_pipeline); the statistics go to outputs/turbo/artifacts_smoke.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from turbo import smoke_pipeline  # benchmarks/ is on the path when a script here runs

from ernielab.core.images import to_uint8
from ernielab.image.evaluate import real_split
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.worlds.registry import DataConfig

FOREGROUND = 60  # max channel above this: a shape pixel
MID_TONE = (15, 60)  # neither background nor shape: edges, halos and grain


def pixel_stats(images: np.ndarray) -> dict[str, float]:
    """images: uint8 [N, H, W, 3] (or [N, 3, H, W])."""
    if images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    brightest = images.max(-1)
    fg = brightest > FOREGROUND
    return {"foreground_fraction": float(fg.mean()),
            "mid_tone_fraction": float(((brightest > MID_TONE[0]) & (brightest < MID_TONE[1])).mean()),
            "background_level": float(brightest[~fg].mean()),
            "exactly_black_fraction": float((brightest == 0).mean()),
            "objects_per_image": float(np.mean([ndimage.label(f)[1] for f in fg]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=None, help="teacher pipeline folder (required unless --smoke)")
    ap.add_argument("--student", action="append", default=[], help="NAME=FOLDER (repeatable)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/turbo/artifacts.json",
                    help="statistics JSON (the measured ones are under benchmarks/results/turbo/); '' = none")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny random stand-in models, 2 images")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(n=2, out="outputs/turbo/artifacts_smoke.json")
        args = ap.parse_args(argv)
        with tempfile.TemporaryDirectory(prefix="turbo_artifacts_smoke_") as tmp:
            args.teacher = args.teacher or str(smoke_pipeline(Path(tmp) / "teacher", seed=0))
            args.student = args.student or [f"smoke={smoke_pipeline(Path(tmp) / 'student', 8, 1.0, seed=1)}"]
            return run(args)
    if args.teacher is None:
        ap.error("--teacher is required (or --smoke)")
    run(args)


def run(args) -> None:
    torch.set_num_threads(1)
    real = real_split(DataConfig(kind="shapes", image_size=32), args.n)
    captions = list(real["caption"])
    rows = {"real (held-out)": pixel_stats(to_uint8(real["image"]))}
    teacher = TextToImagePipeline.from_pretrained(args.teacher)
    rows["teacher 50 steps CFG"] = pixel_stats(teacher(captions, seed=args.seed, batch_size=50,
                                                       output_type="np").images)
    rows["teacher 8 steps no CFG"] = pixel_stats(teacher(captions, seed=args.seed, batch_size=50, num_inference_steps=8,
                                                         guidance_scale=1.0, output_type="np").images)
    for spec in args.student:
        name, _, path = spec.partition("=")
        pipe = TextToImagePipeline.from_pretrained(path)
        rows[f"{name} (8 steps)"] = pixel_stats(pipe(captions, seed=args.seed, batch_size=50, output_type="np").images)
    print("| images | foreground | mid-tone | background level (0-255) | exactly black | objects / image |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['foreground_fraction']:.3f} | {r['mid_tone_fraction']:.4f} | {r['background_level']:.2f} | "
              f"{r['exactly_black_fraction']:.2f} | {r['objects_per_image']:.2f} |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
