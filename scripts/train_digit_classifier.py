"""Train the small MNIST digit classifier used by `ernielab.worlds.digits` and write it to the package assets.

    .venv/bin/python scripts/train_digit_classifier.py            # 75-110 s on one CPU thread
    .venv/bin/python scripts/train_digit_classifier.py --out /tmp/digits.safetensors --epochs 3
"""
from __future__ import annotations

import argparse
import json

import torch

from ernielab.worlds.digits import DEFAULT_WEIGHTS, save_digit_classifier, train_digit_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="where to write the safetensors file")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (same seed and threads, same weights)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, summary = train_digit_classifier(args.epochs, args.batch_size, args.lr, args.seed)
    path = save_digit_classifier(model, args.out, summary)
    print(json.dumps(summary, indent=2))
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
