"""FID/KID between two disjoint sets of *real* shapes-world images: the floor a perfect model would reach
at this sample size (FID is biased upwards for small n).

    .venv/bin/python benchmarks/fid_floor.py --n 500
"""
from __future__ import annotations

import argparse
import json

import torch

from ernielab.core.images import to_uint8
from ernielab.image.fid import compute_fid_kid
from ernielab.worlds.registry import DataConfig, build_dataset, collate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    sets = []
    for split in ("test", "val"):
        ds = build_dataset(DataConfig(kind="shapes", split=split, image_size=args.image_size))
        sets.append(to_uint8(collate([ds[i] for i in range(args.n)])["image"]))
    result = compute_fid_kid(*sets)
    print(json.dumps({"real_test_vs_real_val": result, "n": args.n, "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
