"""Forward time of ernielab's ErnieImageTransformer vs diffusers' ErnieImageTransformer2DModel, same weights.

Both models run in one process on the same inputs, interleaved (ours, theirs, ours, ...) so that
background load hits both alike; we report medians and the ratio diffusers/ours (> 1: ours faster).

    .venv/bin/python benchmarks/transformer_speed.py --threads 1
    .venv/bin/python benchmarks/transformer_speed.py --smoke      # seconds: tiny config, batch 2, one repeat

Prints the result (logged ones: benchmarks/results/transformer_speed_*.json); --out also writes it there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import ErnieImageTransformer2DModel

from ernielab.image.config import ErnieImageConfig
from ernielab.image.transformer import ErnieImageTransformer


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--config", default="small", choices=["tiny", "small", "default"])
    ap.add_argument("--grid", type=int, default=8, help="latent grid side (tokens = grid^2)")
    ap.add_argument("--text-len", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here (default: print only)")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny config, batch 2, 2x2 grid, one repeat")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(config="tiny", batch=2, grid=2, text_len=4, repeats=1, warmup=1)
        args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {"tiny": ErnieImageConfig.tiny(), "small": ErnieImageConfig.small(),
           "default": ErnieImageConfig(hidden_size=192, num_attention_heads=3, num_layers=6, ffn_hidden_size=512,
                                       in_channels=48, out_channels=48, text_in_dim=384,
                                       rope_axes_dim=(16, 24, 24))}[args.config]
    ref = ErnieImageTransformer2DModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    ours = ErnieImageTransformer.from_diffusers(ref).eval()
    x = torch.randn(args.batch, cfg.in_channels, args.grid, args.grid)
    t = torch.rand(args.batch) * 1000
    text = torch.randn(args.batch, args.text_len, cfg.text_in_dim)
    lens = torch.randint(args.text_len // 2, args.text_len + 1, (args.batch,))
    run_ours = lambda: ours(x, t, text, lens)  # noqa: E731
    run_ref = lambda: ref(x, t, text, lens, return_dict=False)[0]  # noqa: E731
    with torch.inference_mode():
        max_diff = (run_ours() - run_ref()).abs().max().item()
        for _ in range(args.warmup):
            run_ours(), run_ref()
        ours_t, ref_t = [], []
        for _ in range(args.repeats):
            ours_t.append(timed(run_ours))
            ref_t.append(timed(run_ref))
    result = {"config": args.config, "batch": args.batch, "tokens": args.grid**2 + args.text_len,
              "threads": args.threads, "ours_ms": 1000 * statistics.median(ours_t),
              "diffusers_ms": 1000 * statistics.median(ref_t), "max_abs_diff": max_diff}
    result["speedup_vs_diffusers"] = result["diffusers_ms"] / result["ours_ms"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
