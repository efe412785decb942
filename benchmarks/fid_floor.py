"""FID/KID between two disjoint sets of *real* shapes-world images: the floor a perfect model would reach
at this sample size (FID is biased upwards for small n).

    .venv/bin/python benchmarks/fid_floor.py --n 500
    .venv/bin/python benchmarks/fid_floor.py --smoke      # seconds: 2 images per set

Prints the result (the logged one is benchmarks/results/fid_floor.json); --out also writes it there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ernielab.core.images import to_uint8
from ernielab.image.fid import compute_fid_kid
from ernielab.worlds.registry import DataConfig, build_dataset, collate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here (default: print only)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 images per set")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(n=2)
        args = ap.parse_args(argv)
    sets = []
    for split in ("test", "val"):
        ds = build_dataset(DataConfig(kind="shapes", split=split, image_size=args.image_size))
        sets.append(to_uint8(collate([ds[i] for i in range(args.n)])["image"]))
    result = compute_fid_kid(*sets, progress=not args.smoke)
    report = json.dumps({"real_test_vs_real_val": result, "n": args.n, "torch_threads": torch.get_num_threads()},
                        indent=2)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
