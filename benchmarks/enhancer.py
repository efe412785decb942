"""Does the prompt enhancer help on underspecified prompts? Alignment with and without it, same seeds.

Intents ("a red thing", "three shapes", "a blue shape left of something") come from held-out
shapes-world scenes (test split), `--n` per scene kind. Each intent is drawn by the bundled image
model twice with the same noise: from the intent itself, and from the enhancer's rewrite. Optionally
(`--reference`) a third time from the scene's own full caption, as a ceiling. Every image is scored by
the alignment detector against the attributes the *intent* specifies (`enhancer.intents.check_intent`),
plus whether the detections form a well-formed shapes-world scene. The rewrites are also checked
for consistency with the intent (valid caption agreeing with every attribute the intent says).

    .venv/bin/python benchmarks/enhancer.py --n 100 --steps 25 --reference     # the logged run
    .venv/bin/python benchmarks/enhancer.py --smoke                            # seconds: 2 intents per kind, 2 steps

The report goes to outputs/enhancer_benchmark/enhancer.json unless --out says otherwise (the logged one is
benchmarks/results/enhancer/enhancer.json: pass `--out benchmarks/results/enhancer/enhancer.json` to rewrite it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ernielab.enhancer.intents import (
    INTENT_ATTRIBUTES,
    caption_consistent,
    check_intent,
    make_intents,
    well_formed_scene,
)
from ernielab.enhancer.model import PromptEnhancer
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.worlds.alignment import check, detect
from ernielab.worlds.shapes import KINDS


def draw(pipe: TextToImagePipeline, prompts: list[str], seed: int, steps: int | None, desc: str,
         chunk: int = 16) -> np.ndarray:
    """uint8 images; image i uses seed + i whatever the chunking (see TextToImagePipeline.initial_noise)."""
    out = []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc):
        out.append(pipe(prompts[start : start + chunk], seed=seed + start, num_inference_steps=steps,
                        output_type="np").images)
    return np.concatenate(out)


def score_images(intents: list[str], images: np.ndarray, captions: list[str] | None = None) -> list[dict]:
    rows = []
    for i, (intent, image) in enumerate(zip(intents, images)):
        dets = detect(image)
        row = {**check_intent(intent, detections=dets), "well_formed": well_formed_scene(dets),
               "detections": [(d.color, d.shape) for d in dets]}
        if captions is not None:  # does the image show what it was actually asked for?
            try:
                row["own_caption_all"] = bool(check(captions[i], image, dets)["all"])
            except ValueError:  # the rewrite is not a caption the checker can read
                row["own_caption_all"] = False
        rows.append(row)
    return rows


def rates(rows: list[dict]) -> dict:
    out = {}
    for key in (*INTENT_ATTRIBUTES, "well_formed", "own_caption_all"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="intents per scene kind")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="image pipeline folder (default: bundled)")
    ap.add_argument("--enhancer", default=None, help="enhancer folder (default: bundled)")
    ap.add_argument("--reference", action="store_true", help="also draw from the scenes' full captions")
    ap.add_argument("--out", default=None, help="report JSON (default: outputs/enhancer_benchmark/enhancer.json, "
                    "or outputs/enhancer_benchmark_smoke/enhancer.json with --smoke)")
    ap.add_argument("--rows", default=None, help="per-image JSONL (default: runs/enhancer_bench/per_image.jsonl, "
                    "or next to the report with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 intents per kind, 2 sampling steps, --reference")
    args = ap.parse_args()
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(n=2, steps=2, reference=True)
        args = ap.parse_args()
    args.out = args.out or ("outputs/enhancer_benchmark_smoke/enhancer.json" if args.smoke
                            else "outputs/enhancer_benchmark/enhancer.json")
    args.rows = args.rows or (str(Path(args.out).with_name("per_image.jsonl")) if args.smoke
                              else "runs/enhancer_bench/per_image.jsonl")
    torch.set_num_threads(1)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    enhancer = PromptEnhancer.from_pretrained(args.enhancer)
    report = {"smoke": args.smoke, "n_per_kind": args.n, "steps": args.steps or pipe.config.steps, "guidance": pipe.config.guidance_scale,
              "seed": args.seed, "torch_threads": torch.get_num_threads(), "kinds": {}, "timing_s": {}}
    all_rows = []
    for kind in KINDS:
        pairs = make_intents(kind, args.n, seed=args.seed)
        intents = [p.intent for p in pairs]
        t0 = time.time()
        revised = enhancer.enhance_many(intents, width=pipe.config.width, height=pipe.config.height,
                                        seed=args.seed, progress=True)
        report["timing_s"][f"enhance_{kind}"] = round(time.time() - t0, 1)
        conditions = {"plain": (intents, None), "enhanced": (revised, revised)}
        if args.reference:
            conditions["reference"] = ([p.target for p in pairs], [p.target for p in pairs])
        entry = {"consistency": round(float(np.mean([caption_consistent(i, r) for i, r in zip(intents, revised)])), 4),
                 "underspecified": round(float(np.mean([not p.spec.complete() for p in pairs])), 4),
                 "examples": [{"intent": i, "revised": r} for i, r in list(zip(intents, revised))[:5]]}
        for name, (prompts, captions) in conditions.items():
            t0 = time.time()
            images = draw(pipe, prompts, args.seed, args.steps, f"{kind} {name}")
            report["timing_s"][f"images_{kind}_{name}"] = round(time.time() - t0, 1)
            rows = score_images(intents, images, captions)
            entry[name] = rates(rows)
            all_rows += [{"kind": kind, "condition": name, "intent": i, "prompt": p, **r}
                         for i, p, r in zip(intents, prompts, rows)]
        report["kinds"][kind] = entry
        print(kind, json.dumps({k: v for k, v in entry.items() if k != "examples"}), flush=True)
    conditions = sorted({r["condition"] for r in all_rows})
    report["overall"] = {c: rates([r for r in all_rows if r["condition"] == c]) for c in conditions}
    report["overall"]["consistency"] = round(float(np.mean([report["kinds"][k]["consistency"] for k in KINDS])), 4)
    for path, text in [(args.out, json.dumps(report, indent=2)),
                       (args.rows, "".join(json.dumps(r) + "\n" for r in all_rows))]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(json.dumps(report["overall"], indent=2))
    print(f"report: {args.out}; per-image rows: {args.rows}")


if __name__ == "__main__":
    main()
