"""Next-row vs next-scale image generation at equal budget: the two tokenizers' reconstruction, then the two
unified models' image alignment, KID/FID against held-out images, decoding steps and time per image.

    OMP_NUM_THREADS=1 python benchmarks/unified_next_scale.py --rows runs/unified_scales/rows/model \
        --scales runs/unified_scales/scales/model --out outputs/next_scale.json

--smoke trains a tiny pair of each (tokenizer and model, a few steps) unless --rows / --scales are given, and
evaluates them on tiny settings without KID/FID (the Inception net alone takes seconds). FID over ~100 images is biased upward and only comparable
between rows of this table; KID is unbiased at this size.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ernielab.core.images import to_uint8
from ernielab.image.fid import fid_kid_from_features, inception_features
from ernielab.unified.evaluation import decoding_speed, heldout, image_alignment
from ernielab.unified.generate import generate_image_codes
from ernielab.unified.io import load_model
from ernielab.unified.tokenizer import TextTokenizer
from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.train import UnifiedTrainConfig, VQTrainConfig, evaluate_vq, train_unified, train_vq
from ernielab.unified.vq import psnr
from ernielab.worlds.shapes import make_prompts


@torch.no_grad()
def prefix_psnr(vq, n: int, seed: int = 0) -> dict[str, float]:
    """PSNR of held-out reconstructions from the first k scales of a multi-scale VQ."""
    images, _ = heldout(n, vq.config.image_size, seed)
    codes = vq.encode(images)
    return {f"scales_1..{k}": psnr(vq.decode(codes, k), images) for k in range(1, len(vq.config.scales) + 1)}


@torch.no_grad()
def seconds_per_image(model, tok, repeats: int) -> dict[str, float]:
    """Best wall time of generating one image alone (batch 1, no guidance, greedy) and its decoding steps."""
    prompt = [tok.encode(make_prompts("single", 1, seed=2)[0])]
    generate_image_codes(model, prompt, temperature=0.0)  # warm-up
    times, steps = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, steps = generate_image_codes(model, prompt, temperature=0.0)
        times.append(time.perf_counter() - t0)
    return {"seconds_per_image_batch1": min(times), "steps": steps}


def evaluate_model(folder: str, args, real_features: torch.Tensor | None, real_images: torch.Tensor) -> dict:
    model, vq, meta = load_model(folder)
    tok = TextTokenizer(model.config.text_vocab)
    out = {"folder": folder, "image_order": model.config.image_order, "steps_trained": meta.get("step"),
           "image_tokens": model.config.image_tokens, "vq": evaluate_vq(vq, args.n_vq)}
    if vq.config.scales:
        out["vq"]["prefix_psnr"] = prefix_psnr(vq, args.n_vq)
    align, images, _ = image_alignment(model, vq, tok, args.per_kind, seed=args.seed, guidance=args.guidance,
                                       top_k=args.sample_top_k)
    out["alignment"] = align
    if real_features is not None:
        fake = inception_features(list(images), progress=False)  # HxWx3 uint8 arrays
        out["fid_kid"] = fid_kid_from_features(real_features, fake)
    out["speed"] = decoding_speed(model, vq, tok, real_images, batch=args.speed_batch, repeats=args.repeats)
    out["speed"].update(seconds_per_image(model, tok, args.repeats))
    return out


def tiny_models(folder: Path) -> tuple[str, str]:
    """A tiny next-row and next-scale model (each with its own tokenizer), trained for a few steps."""
    out = {}
    for name, scales in (("rows", ()), ("scales", (1, 2, 4))):
        vq_dir = folder / f"vq_{name}"
        train_vq(VQTrainConfig(output_dir=str(vq_dir), model=VQConfig.tiny(scales=scales), steps=3, batch_size=4,
                               train_size=16, eval_size=4))
        model = UnifiedConfig.tiny(image_order=name, image_scales=scales)
        train_unified(UnifiedTrainConfig(output_dir=str(folder / name), vq_dir=str(vq_dir), model=model, steps=2,
                                         batch_size=2, train_size=16, tasks=("t2i",)))
        out[name] = str(folder / name / "model")
    return out["rows"], out["scales"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="model folder of the next-row model (needed unless --smoke)")
    parser.add_argument("--scales", help="model folder of the next-scale model (needed unless --smoke)")
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sample-top-k", type=int, default=3)
    parser.add_argument("--n-real", type=int, default=500, help="held-out real images for KID/FID")
    parser.add_argument("--n-vq", type=int, default=256, help="held-out images for the VQ reconstruction")
    parser.add_argument("--speed-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/next_scale.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_kind, args.n_real, args.n_vq, args.repeats, args.speed_batch = 2, 6, 4, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and not (args.rows and args.scales):
            args.rows, args.scales = tiny_models(Path(tmp))
        if not (args.rows and args.scales):
            parser.error("--rows and --scales are required (or --smoke)")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    size = load_model(args.rows)[1].config.image_size
    real_images, _ = heldout(max(args.n_real, args.speed_batch), size, args.seed)
    real_features = None if args.smoke else inception_features(list(to_uint8(real_images[: args.n_real])),
                                                               progress=False)
    report = {"settings": vars(args)}
    for name in ("rows", "scales"):
        report[name] = evaluate_model(getattr(args, name), args, real_features, real_images)
        r = report[name]
        fid_kid = r.get("fid_kid", {})
        print(json.dumps({name: {"align_all": r["alignment"]["all"], "fid": fid_kid.get("fid"),
                                 "kid": fid_kid.get("kid_mean"), "psnr": r["vq"]["psnr"],
                                 "steps": r["speed"]["image_steps"],
                                 "s_per_image": r["speed"]["seconds_per_image_batch1"]}}))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
                   + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
