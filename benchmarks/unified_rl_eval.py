"""Evaluate a unified model folder exactly as `ernielab unified rl` evaluates its result (caption accuracy on
held-out images, image alignment per kind at the config's guidance): the "before" row of an RL table.

    python benchmarks/unified_rl_eval.py runs/unified_3k/moe/model --config configs/unified/rl_3k.json --out OUT.json
    python benchmarks/unified_rl_eval.py --smoke     # a tiny random model, 4 captions, 1 image per kind (seconds)
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ernielab.core.cli import load_config
from ernielab.unified.evaluation import caption_accuracy, heldout, image_alignment
from ernielab.unified.io import load_model
from ernielab.unified.rl import UnifiedRLConfig
from ernielab.unified.tokenizer import TextTokenizer


def evaluate(model_dir: Path, cfg: UnifiedRLConfig) -> dict:
    model, vq, _ = load_model(model_dir)
    tok = TextTokenizer(model.config.text_vocab)
    images, _ = heldout(cfg.eval_captions, vq.config.image_size, cfg.seed)
    captions = caption_accuracy(model, vq, tok, images)
    alignment, _, _ = image_alignment(model, vq, tok, cfg.eval_per_kind, seed=cfg.seed, guidance=cfg.eval_guidance)
    return {"caption_accuracy": captions["accuracy"], "image_alignment": alignment["all"],
            **{f"image_alignment_{k}": v for k, v in alignment["by_kind"].items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--config", type=Path, default=Path("configs/unified/rl_3k.json"))
    parser.add_argument("--out", type=Path, default=Path("outputs/unified_rl_eval.json"))
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and tiny evaluation sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(UnifiedRLConfig, args.config)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from unified_speed import smoke_models  # benchmarks/ is on the path when a script here runs

            args.model, _ = smoke_models(Path(tmp))
            cfg = cfg.replace(eval_captions=4, eval_per_kind=1)
        elif args.model is None:
            parser.error("a model folder is required (or --smoke)")
        result = {"model": str(args.model), **evaluate(args.model, cfg)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
