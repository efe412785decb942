"""Aesthetic scorer on the self-generated tiered benchmark: MLP and linear Bradley-Terry heads on
frozen Inception features, against no-learning baselines. Writes the report JSON (and, with --ship, the MLP head).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/aesthetic.py --n-train 600 --n-test 300     # the logged run
    .venv/bin/python benchmarks/aesthetic.py --smoke                                         # seconds: pixel head only

Each head trains with its config in configs/aesthetic/ (HEADS below), through the same engine task as
`ernielab aesthetic train`, on the same benchmark content (`--n-train 600 --n-test 300`, seed 0, is what
`ernielab aesthetic benchmark runs/aesthetic/bench --n-train 600 --n-test 300` builds). Output goes to
outputs/aesthetic_benchmark/ unless --out says otherwise (the logged report is
benchmarks/results/aesthetic/results.json: pass `--out benchmarks/results/aesthetic` to rewrite it, and
`--ship src/ernielab/assets/aesthetic` to replace the shipped head).

Steps (each timed): build the benchmark (degraded shapes-world renders, Swiss tournament of a noisy
judge, decile tiers), extract Inception features once per image (cached), train each head on the
train split's judgments, evaluate SRCC / PLCC against the test tiers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ernielab.aesthetic.scorer import QUALITY_CUES, pair_accuracy, tier_report
from ernielab.aesthetic.tiered import TieredBenchmarkConfig, build_benchmark, load_images, read_judgments, read_tiered
from ernielab.aesthetic.train import AestheticTrainConfig, cached_features, split_pairs, train_head

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "aesthetic"
HEADS = {  # name: training config
    "inception_mlp": CONFIGS / "default.json",  # the shipped head
    "inception_linear": CONFIGS / "inception_linear.json",
    "pixels8_mlp": CONFIGS / "pixels8_mlp.json",
}
SMOKE_HEADS = ("pixels8_mlp",)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def method_report(scores, tiers, test_pairs) -> dict:
    report = tier_report(np.asarray(scores, dtype=np.float64), tiers)
    report["test_pair_accuracy"] = pair_accuracy(torch.as_tensor(np.asarray(scores, dtype=np.float64)), test_pairs)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=None, help="default: TieredBenchmarkConfig's (1000)")
    ap.add_argument("--n-test", type=int, default=None, help="default: TieredBenchmarkConfig's (500)")
    ap.add_argument("--steps", type=int, default=None, help="head training steps (default: each config's, 1500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="benchmark, feature cache and head runs "
                    "(default: runs/aesthetic/benchmark, or outputs/aesthetic_benchmark_smoke/work with --smoke)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json "
                    "(default: outputs/aesthetic_benchmark, or outputs/aesthetic_benchmark_smoke with --smoke)")
    ap.add_argument("--ship", type=Path, default=None,
                    help="also save the inception_mlp scorer here (e.g. src/ernielab/assets/aesthetic)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: 40/30 images, 20 steps, the pixel head only (no Inception)")
    args = ap.parse_args()
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(n_train=40, n_test=30, steps=20)
        args = ap.parse_args()
        if args.ship:
            ap.error("--ship needs the Inception heads; not with --smoke")
    args.work = args.work or Path("outputs/aesthetic_benchmark_smoke/work" if args.smoke
                                  else "runs/aesthetic/benchmark")
    args.out = args.out or Path("outputs/aesthetic_benchmark_smoke" if args.smoke else "outputs/aesthetic_benchmark")
    heads = {k: v for k, v in HEADS.items() if k in SMOKE_HEADS or not args.smoke}
    torch.set_num_threads(1)
    bench, cache = args.work / "bench", args.work / "features"
    times: dict[str, float] = {}

    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    cfg = TieredBenchmarkConfig(**sizes, seed=args.seed)
    summary, times["build_benchmark_s"] = timed(build_benchmark, bench, cfg)

    train_paths, judgments = read_judgments(bench, "train")
    test_items = read_tiered(bench, "test")
    test_paths, test_tiers = [it.path for it in test_items], np.asarray([it.tier for it in test_items])
    _, test_pairs = read_judgments(bench, "test")
    test_pairs = torch.from_numpy(test_pairs)
    train_tiers = {it.path.name: it.tier for it in read_tiered(bench, "train")}
    train_tiers = np.asarray([train_tiers[p.name] for p in train_paths])

    configs = {}
    for name, path in heads.items():
        train_cfg = AestheticTrainConfig.load(path).replace(
            benchmark=str(bench), output_dir=str(args.work / name), feature_cache=str(cache), seed=args.seed,
            resume="")  # a fresh run each time: the benchmark may have changed
        configs[name] = train_cfg.replace(steps=args.steps) if args.steps else train_cfg

    features = {}
    for spec in sorted({c.backbone for c in configs.values()}):
        (features[spec, "train"], t1) = timed(cached_features, spec, train_paths, cache)
        (features[spec, "test"], t2) = timed(cached_features, spec, test_paths, cache)
        times[f"features_{spec}_s"] = t1 + t2

    methods, training = {}, {}
    for name, train_cfg in configs.items():
        spec = train_cfg.backbone
        train_pairs, val_pairs = (torch.from_numpy(p) for p in split_pairs(judgments, train_cfg.val_fraction,
                                                                           train_cfg.seed))
        (scorer, result), times[f"train_{name}_s"] = timed(
            train_head, features[spec, "train"], train_pairs, train_cfg, val_pairs, train_tiers)
        training[name] = {"steps": result["step"], **result["eval"]}
        methods[name] = method_report(scorer.score_features(features[spec, "test"]).numpy(), test_tiers, test_pairs)
        if name == "inception_mlp" and args.ship:
            scorer.save_pretrained(args.ship)

    rng = np.random.default_rng(args.seed)
    methods["random"] = method_report(rng.normal(size=len(test_tiers)), test_tiers, test_pairs)
    images = torch.from_numpy(np.stack(load_images(test_paths))).permute(0, 3, 1, 2)
    for name, (cue, sign) in QUALITY_CUES.items():
        methods[name] = method_report(sign * cue(images).numpy(), test_tiers, test_pairs)
    if ("inception", "test") in features:
        methods["inception_feature_norm"] = method_report(features["inception", "test"].norm(dim=1).numpy(),
                                                          test_tiers, test_pairs)
    annotations = json.loads((bench / "test" / "annotations.json").read_text())
    methods["oracle_latent_quality"] = method_report([a["quality"] for a in annotations], test_tiers, test_pairs)

    result = {"benchmark": summary, "training": training, "methods": methods, "wall_times_s": times,
              "torch_threads": torch.get_num_threads(), "shipped_scorer": str(args.ship) if args.ship else None,
              "smoke": args.smoke}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {m: round(v[m], 4) for m in ("srcc", "plcc", "test_pair_accuracy")}
                      for k, v in methods.items()}, indent=2))
    print(json.dumps(times, indent=2))
    print(f"report: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
