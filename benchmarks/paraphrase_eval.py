"""Does the image model keep its alignment when the same facts are worded differently?

For each kind (single, count, relation) the alignment set's `--n` prompts (`shapes.make_prompts`) are drawn
twice from the same noise: as the template and as a held-out rewording of the same spec (the EVAL phrasebook
of `worlds.phrasing`: paraphrases, detailed descriptions, keyword lists, digits; no training caption uses its
frames or wordings). Both are scored by the alignment detector against the same spec. `--enhance` adds a third
drawing: the bundled prompt enhancer's rewrite of the paraphrase. `--holdout` adds the compositional split
(prompts stating held-out colour x shape x relation combinations vs seen ones).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paraphrase_eval.py --n 100 --seeds 0 1 \
        --out outputs/paraphrase_eval.json                       # the logged baseline (bundled model)
    .venv/bin/python benchmarks/paraphrase_eval.py --smoke       # seconds: 2 prompts per kind, 2 steps

One seed per run fits a CPU better; `--merge A.json B.json --out C.json` joins such runs into one report.

The report is JSON (per seed: per kind, per wording, per attribute and per style; paired all-correct counts)
and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernielab.image.evaluate import WORDINGS, ImageDrawer, compositional_alignment, paraphrase_alignment
from ernielab.image.pipeline import DEFAULT_MODEL, TextToImagePipeline
from ernielab.worlds.shapes import KINDS

ATTRIBUTES = ("color", "shape", "count", "relation", "all")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="pipeline folder (default: the bundled model)")
    ap.add_argument("--n", type=int, default=100, help="prompts per kind")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--enhance", action="store_true", help="also draw the bundled enhancer's rewrite of each paraphrase")
    ap.add_argument("--wordings", nargs="+", choices=WORDINGS, default=None,
                    help="what to draw (default: template paraphrase, plus enhanced with --enhance)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--holdout", nargs="*", default=[], help="held-out combinations, e.g. 'red triangle left of'")
    ap.add_argument("--out", default=None, help="JSON report (default outputs/paraphrase_eval.json)")
    ap.add_argument("--smoke", action="store_true", help="2 prompts per kind, 2 steps, seed 0: checks the code path")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine reports of the same settings run one seed at a time into --out (draws nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.seeds, args.steps = 2, [0], 2
    args.out = args.out or ("outputs/paraphrase_eval_smoke.json" if args.smoke else "outputs/paraphrase_eval.json")
    if args.n < 1:
        ap.error("--n must be >= 1")
    if args.wordings and "enhanced" in args.wordings:
        args.enhance = True
    args.wordings = tuple(args.wordings or (WORDINGS if args.enhance else WORDINGS[:2]))
    return args


def table(report: dict) -> str:
    """Markdown: one row per kind x wording, all-correct and per attribute, one column group per seed."""
    seeds = list(report["by_seed"])
    wordings = [w for w in WORDINGS if any(w in r.get(k, {}) for r in report["by_seed"].values() for k in KINDS)]
    head = "| kind | wording | " + " | ".join(f"{a} (seed {s})" for s in seeds for a in ATTRIBUTES) + " |"
    lines = [head, "|" + "---|" * (2 + len(seeds) * len(ATTRIBUTES))]
    for kind in KINDS:
        for wording in wordings:
            cells = []
            for s in seeds:
                rates = report["by_seed"][s].get(kind, {}).get(wording)
                cells += ["n/a" if rates is None else "-" if rates[a] is None else f"{rates[a]:.2f}" for a in ATTRIBUTES]
            lines.append(f"| {kind} | {wording} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """One report from several runs that differ only in their seeds."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("model", "n", "steps", "smoke")
    for r in reports[1:]:
        if any(r[k] != reports[0][k] for k in keys):
            raise SystemExit(f"error: cannot merge runs with different settings ({', '.join(keys)})")
    out = {**reports[0], "seeds": sorted({s for r in reports for s in r["seeds"]}), "by_seed": {},
           "merged_from": paths, "enhance": any(r["enhance"] for r in reports)}
    for r in reports:  # runs may hold other wordings or kinds of the same seed: merge them key by key
        _deep_update(out["by_seed"], r["by_seed"])
    out["wordings"] = [w for w in WORDINGS if any(w in r.get("wordings", WORDINGS[:2]) for r in reports)]
    # complete when every seed has every kind in every wording, whichever runs they came from
    out["partial"] = any(w not in result.get(k, {}) for result in out["by_seed"].values() for k in KINDS
                         for w in out["wordings"])
    out["seconds"] = sum(r["seconds"] for r in reports)
    images = sum(r["generation"]["images"] for r in reports)
    seconds = sum(r["generation"]["seconds"] for r in reports)
    out["generation"] = {"images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}
    return out


def _deep_update(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def write(report: dict, out: Path, quiet: bool = False) -> None:
    report["table"] = table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    tmp.replace(out)
    if quiet:
        return
    print(report["table"])
    print(f"wrote {out} ({report['seconds']:.0f} s, {report['generation']['images']} images)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        report = merge(args.merge)
        write(report, Path(args.out))
        return report
    with torch.no_grad():  # not set_grad_enabled: a caller (a test) keeps its own grad mode
        return measure(args)


def measure(args) -> dict:
    pipe = TextToImagePipeline.from_pretrained(args.model)
    enhancer = None
    if args.enhance:
        from ernielab.enhancer.model import PromptEnhancer

        enhancer = PromptEnhancer.from_pretrained()
    draw = ImageDrawer(pipe, pipe.config.height, steps=args.steps, batch_size=args.batch_size)
    t0 = time.time()
    report: dict = {"model": args.model, "n": args.n, "seeds": args.seeds, "steps": args.steps or pipe.config.steps,
                    "enhance": args.enhance, "wordings": list(args.wordings), "smoke": args.smoke,
                    "torch_threads": torch.get_num_threads(), "partial": True, "by_seed": {}}

    def save(done: bool = False) -> None:  # after every kind, so a stopped run keeps what it measured
        report["partial"] = not done
        report["seconds"] = time.time() - t0
        report["generation"] = {**draw.timing,
                                "images_per_s": draw.timing["images"] / max(draw.timing["seconds"], 1e-9)}
        write(report, Path(args.out), quiet=not done)

    for seed in args.seeds:
        result = report["by_seed"].setdefault(str(seed), {})
        paraphrase_alignment(draw, args.n, seed, kinds=args.kinds, enhancer=enhancer, wordings=args.wordings,
                             on_kind=lambda kind, summary: (result.__setitem__(kind, summary), save()))
        if args.holdout:
            result["compositional"] = compositional_alignment(draw, args.holdout, args.n, seed)
    save(done=True)
    return report


if __name__ == "__main__":
    main()
