"""Does `generate --enhance` keep prompts worded unlike the training captions? Alignment with and without the
enhancer, and with the fallback to the prompt where the rewrite contradicts it.

Prompts come from `worlds.phrasing.paraphrase_prompts` (its eval phrasebook: no enhancer training pair used those
wordings), `--n` per kind. Each prompt is drawn by the bundled image model from the prompt itself ("plain") and,
per enhancer, from its rewrite ("<name>"; from the prompt where it is too long for the enhancer's context,
counted as a contradiction); image i uses seed + i in every condition. "<name>+fallback" draws from
the prompt where `worlds.prompt_facts.contradictions` finds the rewrite contradicts it, which is what the pipeline
does by default: with the same seed that image *is* the plain one, so it is taken from there, not drawn again.
Every image is scored with the alignment checker against the prompt's own spec (`worlds.alignment.check`).

    .venv/bin/python benchmarks/enhancer_paraphrase.py --n 100 --steps 25 --seeds 0 \\
        --enhancer old=runs/enhancer_b4c7859 --enhancer new=src/ernielab/assets/enhancer
    .venv/bin/python benchmarks/enhancer_paraphrase.py --smoke      # seconds: 2 prompts per kind, 2 steps

Drawn images are cached per (condition, kind, seed, steps, n) under `--cache`, so a later run with another
enhancer reuses the plain images. The report goes to outputs/enhancer_paraphrase/report.json unless --out says
otherwise.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ernielab.enhancer.model import PromptEnhancer
from ernielab.enhancer.train import rewrite_if_it_fits
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.worlds.alignment import check
from ernielab.worlds.phrasing import paraphrase_prompts
from ernielab.worlds.prompt_facts import contradictions
from ernielab.worlds.shapes import KINDS

ATTRIBUTES = ("color", "shape", "count", "relation", "all")


def draw(pipe: TextToImagePipeline, prompts: list[str], seed: int, steps: int, desc: str, cache: Path,
         chunk: int = 16) -> np.ndarray:
    """uint8 images, image i from seed + i whatever the chunking; reused from `cache` when drawn before."""
    if cache.is_file():
        saved = np.load(cache)
        if [str(p) for p in saved["prompts"]] == prompts:
            return saved["images"]
    out = []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc):
        out.append(pipe(prompts[start : start + chunk], seed=seed + start, num_inference_steps=steps,
                        output_type="np").images)
    images = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, images=images, prompts=np.array(prompts))
    return images


def rates(scores: list[dict]) -> dict[str, float | None]:
    out = {}
    for key in ATTRIBUTES:
        values = [s[key] for s in scores if s.get(key) is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
    return out


def named_enhancers(specs: list[str]) -> dict[str, Path | None]:
    """NAME=FOLDER (or FOLDER, named by its folder) -> {name: folder}; none given: the bundled one."""
    if not specs:
        return {"bundled": None}
    out = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        out[name] = Path(folder)
    return out


def run_seed(pipe, enhancers: dict, args, seed: int, report: dict) -> None:
    for kind in KINDS:
        items = paraphrase_prompts(kind, args.n, seed)
        texts, specs = [t for t, _ in items], [s for _, s in items]
        stem = f"{kind}_s{seed}_steps{args.steps}_n{args.n}"
        t0 = time.time()
        plain = draw(pipe, texts, seed, args.steps, f"{kind} plain", args.cache / f"plain_{stem}.npz")
        entry = {"timing_s": {"plain": round(time.time() - t0, 1)}}
        plain_scores = [check(spec, image) for spec, image in zip(specs, plain)]
        entry["plain"] = rates(plain_scores)
        for name, enhancer in enhancers.items():
            t0 = time.time()
            revised = [rewrite_if_it_fits(enhancer, t, seed + i, pipe.config.width, pipe.config.height)
                       for i, t in enumerate(tqdm(texts, desc=f"{kind} enhance {name}"))]
            reasons = [contradictions(t, r) if r is not None else ["too long for the enhancer"]
                       for t, r in zip(texts, revised)]
            revised = [t if r is None else r for t, r in zip(texts, revised)]  # no rewrite: the prompt
            images = draw(pipe, revised, seed, args.steps, f"{kind} {name}", args.cache / f"{name}_{stem}.npz")
            entry["timing_s"][name] = round(time.time() - t0, 1)
            scores = [check(spec, image) for spec, image in zip(specs, images)]
            mixed = [p if r else s for p, s, r in zip(plain_scores, scores, reasons)]
            entry[name] = {**rates(scores), "consistent": round(float(np.mean([not r for r in reasons])), 4),
                           "too_long": sum(r == ["too long for the enhancer"] for r in reasons)}
            entry[f"{name}+fallback"] = rates(mixed)
            entry[f"{name}_examples"] = [{"prompt": t, "revised": r, "contradicts": c}
                                         for t, r, c in list(zip(texts, revised, reasons))[:5]]
        report["seeds"].setdefault(str(seed), {})[kind] = entry
        print(seed, kind, json.dumps({k: v for k, v in entry.items() if not k.endswith("_examples")}), flush=True)


def overall(report: dict, conditions: list[str]) -> dict:
    """Mean over seeds and kinds (equal n per kind)."""
    cells = [kinds[k] for kinds in report["seeds"].values() for k in KINDS]
    out = {}
    for c in conditions:
        out[c] = {key: round(float(np.mean([cell[c][key] for cell in cells if cell[c].get(key) is not None])), 4)
                  for key in ("all", "consistent") if any(cell[c].get(key) is not None for cell in cells)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="prompts per kind")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--model", default=None, help="image pipeline folder (default: bundled)")
    ap.add_argument("--enhancer", action="append", default=[], metavar="NAME=FOLDER",
                    help="enhancer to compare (repeat; default: the bundled one)")
    ap.add_argument("--cache", type=Path, default=Path("runs/enhancer_paraphrase/images"))
    ap.add_argument("--out", default=None, help="report JSON (default: outputs/enhancer_paraphrase/report.json)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 prompts per kind, 2 steps")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.steps = 2, 2
        args.cache = Path("outputs/enhancer_paraphrase_smoke/images")
    args.out = args.out or ("outputs/enhancer_paraphrase_smoke/report.json" if args.smoke
                            else "outputs/enhancer_paraphrase/report.json")
    torch.set_num_threads(1)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    folders = named_enhancers(args.enhancer)
    enhancers = {name: PromptEnhancer.from_pretrained(folder) for name, folder in folders.items()}
    report = {"smoke": args.smoke, "n_per_kind": args.n, "steps": args.steps, "seeds": {},
              "guidance": pipe.config.guidance_scale, "enhancers": {k: str(v) for k, v in folders.items()}}
    for seed in args.seeds:
        run_seed(pipe, enhancers, args, seed, report)
    conditions = ["plain", *[c for name in enhancers for c in (name, f"{name}+fallback")]]
    report["overall"] = overall(report, conditions)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["overall"], indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
