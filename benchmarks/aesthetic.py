"""Aesthetic scorer on the self-generated tiered benchmark: MLP and linear Bradley-Terry heads on
frozen Inception features, against no-learning baselines. Writes the report JSON and ships the MLP head.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/aesthetic.py --n-train 1000 --n-test 500

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

from ernielab.aesthetic.scorer import DEFAULT_SCORER, QUALITY_CUES, pair_accuracy, tier_report
from ernielab.aesthetic.tiered import TieredBenchmarkConfig, build_benchmark, load_images, read_judgments, read_tiered
from ernielab.aesthetic.train import AestheticTrainConfig, cached_features, calibrate, split_pairs, train_head

HEADS = {  # name: (backbone, hidden)
    "inception_mlp": ("inception", 128),
    "inception_linear": ("inception", 0),
    "pixels8_mlp": ("pixels:8", 128),
}


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
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/aesthetic/benchmark"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/aesthetic"))
    ap.add_argument("--ship", type=Path, default=DEFAULT_SCORER, help="where the inception_mlp scorer is saved")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench, cache = args.work / "bench", args.work / "features"
    times: dict[str, float] = {}

    cfg = TieredBenchmarkConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    summary, times["build_benchmark_s"] = timed(build_benchmark, bench, cfg)

    train_paths, judgments = read_judgments(bench, "train")
    test_items = read_tiered(bench, "test")
    test_paths, test_tiers = [it.path for it in test_items], np.asarray([it.tier for it in test_items])
    _, test_pairs = read_judgments(bench, "test")
    test_pairs = torch.from_numpy(test_pairs)
    train_tiers = {it.path.name: it.tier for it in read_tiered(bench, "train")}
    train_tiers = np.asarray([train_tiers[p.name] for p in train_paths])
    train_pairs, val_pairs = (torch.from_numpy(p) for p in split_pairs(judgments, 0.1, args.seed))

    features = {}
    for spec in sorted({b for b, _ in HEADS.values()}):
        (features[spec, "train"], t1) = timed(cached_features, spec, train_paths, cache)
        (features[spec, "test"], t2) = timed(cached_features, spec, test_paths, cache)
        times[f"features_{spec}_s"] = t1 + t2

    methods, training = {}, {}
    for name, (spec, hidden) in HEADS.items():
        train_cfg = AestheticTrainConfig(output_dir=str(args.work / name), backbone=spec, hidden=hidden,
                                         steps=args.steps, seed=args.seed)
        (scorer, report), times[f"train_{name}_s"] = timed(
            train_head, features[spec, "train"], train_pairs, train_cfg, val_pairs)
        calibrate(scorer, features[spec, "train"], train_tiers)
        training[name] = report
        methods[name] = method_report(scorer.score_features(features[spec, "test"]).numpy(), test_tiers, test_pairs)
        if name == "inception_mlp":
            scorer.save_pretrained(args.ship)

    rng = np.random.default_rng(args.seed)
    methods["random"] = method_report(rng.normal(size=len(test_tiers)), test_tiers, test_pairs)
    images = torch.from_numpy(np.stack(load_images(test_paths))).permute(0, 3, 1, 2)
    for name, (cue, sign) in QUALITY_CUES.items():
        methods[name] = method_report(sign * cue(images).numpy(), test_tiers, test_pairs)
    methods["inception_feature_norm"] = method_report(features["inception", "test"].norm(dim=1).numpy(),
                                                      test_tiers, test_pairs)
    annotations = json.loads((bench / "test" / "annotations.json").read_text())
    methods["oracle_latent_quality"] = method_report([a["quality"] for a in annotations], test_tiers, test_pairs)

    result = {"benchmark": summary, "training": training, "methods": methods, "wall_times_s": times,
              "torch_threads": torch.get_num_threads(), "shipped_scorer": str(args.ship)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {m: round(v[m], 4) for m in ("srcc", "plcc", "test_pair_accuracy")}
                      for k, v in methods.items()}, indent=2))
    print(json.dumps(times, indent=2))


if __name__ == "__main__":
    main()
