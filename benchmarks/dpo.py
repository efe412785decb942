"""Diffusion-DPO on the bundled shapes-world model: make pairs, align, and score alignment + FID before/after.

1. pairs: count and relation prompts (prompt seed 1; relation prompts that are in the evaluation set are
   dropped, count prompts cannot be: there are only 36 of them), K candidates each from the bundled model
   with `--pair-steps` Euler steps (fewer than the 50 used for evaluation, to save time), judged by the
   alignment checker; noise seeds start at 1,000,000 so no candidate shares noise with an evaluation image.
2. variants, each `--dpo-steps` steps from the bundled model on the same pairs, seed, batch and lr (beta 0.05,
   lambda_win 0.35, lambda_lose 0.15): "report" (the default loss: the report's lambda_win err_w +
   lambda_lose err_l), "hinge" (the earlier default, anchors x beta_eff; "stabilized" is its old name),
   "raw_anchors" (the hinge's anchors on raw errors) and "plain" (Diffusion-DPO alone).
3. evaluation of base and each variant with the model's sampling defaults (CFG 4, shift 1; 50 steps unless
   `--eval-steps`):
   alignment on `--n-align` count and relation prompts (make_prompts seed 0, image seeds 100000 + i, as
   `ernielab eval`) and FID/KID of `--n-fid` images for held-out captions against the real held-out images;
   with `--aesthetic default` also the mean aesthetic score (ernielab.aesthetic.scorer) of those images.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dpo.py
    .venv/bin/python benchmarks/dpo.py --smoke      # seconds: 2 prompts per kind, 2 DPO steps, one variant

Every stage is skipped when its output exists, so an interrupted run continues where it stopped (with --smoke
the run folder is a fresh temporary one unless --out names one).
Results: outputs/benchmarks/dpo/dpo.json (outputs/benchmarks/dpo_smoke/dpo.json with --smoke; + contact sheets
under the run folder); `--results benchmarks/results/dpo` replaces the committed results.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ernielab.core.images import save_grid, to_uint8
from ernielab.dpo.preferences import PAIRS_FILE, make_pairs
from ernielab.dpo.train import DPOSettings, DPOTrainConfig, DPOTrainer
from ernielab.image.evaluate import real_split, score_alignment
from ernielab.image.fid import compute_fid_kid
from ernielab.image.pipeline import DEFAULT_MODEL, TextToImagePipeline
from ernielab.worlds.registry import DataConfig
from ernielab.worlds.shapes import make_prompts

EVAL_KINDS = ("count", "relation")
PAIR_NOISE_SEED = 1_000_000
# every variant: the same pairs file, seed, steps, batch and lr; only the loss differs
VARIANTS = {"report": {"loss": "report"},  # the ERNIE-Image report's stabilized DPO (the default)
            "hinge": {"loss": "hinge"},  # the earlier default (anchors x beta_eff, hinge on the rejected side)
            "stabilized": {"loss": "hinge"},  # the 2026-11-24 name of "hinge" (benchmarks/results/dpo)
            "raw_anchors": {"loss": "hinge", "anchors_in_reward_units": False},
            "plain": {"loss": "plain"}}  # Diffusion-DPO alone (= the old lambdas 0: the same numbers)


def pair_prompts(n_per_kind: int, n_eval: int) -> list[str]:
    held_out = set(make_prompts("relation", n_eval, seed=0))
    relation = [p for p in make_prompts("relation", n_per_kind + n_eval, seed=1) if p not in held_out]
    return relation[:n_per_kind] + make_prompts("count", n_per_kind, seed=1)


def build_pairs(args, out: Path) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    t = time.time()
    pipe = TextToImagePipeline.from_pretrained(DEFAULT_MODEL)
    summary = make_pairs(pipe, pair_prompts(args.pair_prompts, args.n_align), out, candidates=args.candidates,
                         seed=PAIR_NOISE_SEED, num_inference_steps=args.pair_steps, prompts_per_batch=8)
    summary.update(seconds=time.time() - t, sampling_steps=args.pair_steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_variant(args, name: str, pairs: Path, out: Path) -> dict:
    settings = DPOSettings(pairs=str(pairs), beta=args.beta, **VARIANTS[name])
    cfg = DPOTrainConfig(init_from=str(DEFAULT_MODEL), dpo=settings, output_dir=str(out), steps=args.dpo_steps,
                         batch_size=args.batch, lr=args.lr, warmup_steps=min(20, args.dpo_steps),
                         log_every=min(10, args.dpo_steps), save_every=min(100, args.dpo_steps),
                         seed=args.seed)
    if not (out / "pipeline" / "pipeline.json").is_file():
        DPOTrainer(cfg).train()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    last = logged[-max(1, len(logged) // 10):]  # last ~10% of logs
    keys = ("loss", "dpo", "err_w", "err_l", "delta_w", "delta_l", "reward_margin", "reward_acc")
    return {"config": {"loss": settings.loss, "beta": settings.beta, "beta_eff": settings.beta_eff, "lambda_win": settings.lambda_win,
                       "lambda_lose": settings.lambda_lose,
                       "anchors_in_reward_units": settings.anchors_in_reward_units, "steps": args.dpo_steps,
                       "batch_pairs": args.batch, "lr": args.lr},
            "final_train_stats": {k: sum(r[k] for r in last) / len(last) for k in keys},
            "train_seconds": logged[-1]["elapsed_s"] if logged else None}


def generate(pipe, prompts: list[str], seed: int, steps: int | None) -> torch.Tensor:
    return torch.cat([pipe(prompts[s : s + 50], seed=seed + s, num_inference_steps=steps, batch_size=50,
                           output_type="pt").images for s in range(0, len(prompts), 50)])


def evaluate_model(args, model_dir: Path, out: Path) -> dict:
    report_file = out / "eval.json"
    if report_file.is_file():
        return add_aesthetic(args, model_dir, json.loads(report_file.read_text()), report_file)
    t = time.time()
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    report, sheet = {"alignment": {}}, ([], [])
    for kind in EVAL_KINDS:
        prompts = make_prompts(kind, args.n_align, seed=0)
        images = to_uint8(generate(pipe, prompts, 100_000, args.eval_steps))  # the seeds `ernielab eval --seed 0` uses
        report["alignment"][kind] = score_alignment("shapes", prompts, list(images))["overall"]
        sheet[0].extend(images[:16])
        sheet[1].extend(prompts[:16])
    if args.n_fid > 0:
        real = real_split(DataConfig(kind="shapes", image_size=32), args.n_fid)
        fake = generate(pipe, list(real["caption"]), 0, args.eval_steps)
        report["fid_kid"] = compute_fid_kid(to_uint8(real["image"]), to_uint8(fake), progress=False)
    report["seconds"] = time.time() - t
    out.mkdir(parents=True, exist_ok=True)
    save_grid(list(sheet[0]), out / "contact_sheet.png", captions=sheet[1], cols=8)
    report_file.write_text(json.dumps(report, indent=2))
    return add_aesthetic(args, model_dir, report, report_file)


def add_aesthetic(args, model_dir: Path, report: dict, report_file: Path) -> dict:
    """Mean aesthetic score (ernielab.aesthetic.scorer's scorer) of the images for the FID captions."""
    if not args.aesthetic or "aesthetic" in report or args.n_fid <= 0:
        return report
    from ernielab.aesthetic.scorer import load_scorer

    scorer = load_scorer(None if args.aesthetic == "default" else args.aesthetic)
    captions = list(real_split(DataConfig(kind="shapes", image_size=32), args.n_fid)["caption"])
    images = to_uint8(generate(TextToImagePipeline.from_pretrained(model_dir), captions, 0, args.eval_steps))
    scores = scorer.score(torch.from_numpy(images).permute(0, 3, 1, 2))
    report["aesthetic"] = {"mean": scores.mean().item(), "std": scores.std().item(), "n": len(scores),
                           "scorer": args.aesthetic}
    report_file.write_text(json.dumps(report, indent=2))
    return report


SMOKE = dict(results="outputs/benchmarks/dpo_smoke", pair_prompts=2, candidates=4, pair_steps=2, dpo_steps=2,
             batch=2, n_align=1, n_fid=2, eval_steps=2, variants="report")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: runs/dpo_bench; with --smoke a fresh "
                        "temporary folder)")
    parser.add_argument("--results", default="outputs/benchmarks/dpo",
                        help="folder for dpo.json (the committed results are in benchmarks/results/dpo)")
    parser.add_argument("--pair-prompts", type=int, default=150, help="per kind (count, relation)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--pair-steps", type=int, default=20)
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--n-align", type=int, default=100)
    parser.add_argument("--n-fid", type=int, default=200)
    parser.add_argument("--eval-steps", type=int, default=None, help="default: the model's 50")
    parser.add_argument("--variants", default="report,hinge,plain", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aesthetic", default="", help="'default' or a scorer folder: also report its mean score")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if args.out is None and args.smoke:
        with tempfile.TemporaryDirectory(prefix="dpo_smoke_") as tmp:
            args.out = tmp
            return run(args)
    args.out = args.out or "runs/dpo_bench"
    run(args)


def run(args) -> None:
    torch.set_num_threads(1)
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"args": vars(args), "pairs": build_pairs(args, out / "pairs"), "models": {}}
    report["models"]["base"] = evaluate_model(args, DEFAULT_MODEL, out / "eval_base")
    for name in [v for v in args.variants.split(",") if v]:
        training = train_variant(args, name, out / "pairs" / PAIRS_FILE, out / name)
        report["models"][name] = {**evaluate_model(args, out / name / "pipeline", out / f"eval_{name}"), **training}
        report["wall_seconds"] = time.time() - t0
        (results / "dpo.json").write_text(json.dumps(report, indent=2))  # after every variant: partial results
    print(json.dumps({k: {"alignment": m["alignment"], "fid": m.get("fid_kid", {}).get("fid")}
                      for k, m in report["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
