"""Accuracy of dense Transformer, BigBird, HST and HST+SAR on LRA-style tasks at one equal CPU budget.

Every model gets the same preset (width, depth, heads, MLP), the same data, batch size, steps, learning
rate schedule and seed; only the attention topology (and, for HST+SAR, the loss) differs. Runs resume
from their checkpoints and results are merged into --out, so models can be trained one per call:

    python benchmarks/sparse_lra.py --task listops --models dense --threads 1
    python benchmarks/sparse_lra.py --task listops --models bigbird,hst,hst-sar --threads 1

Missing data is generated first (ListOps: official generator spec with the lengths given here;
Pathfinder: the Pathfinder-style generator, 32x32).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernielab.data.lra import ListOpsSpec, PathfinderSpec, load_task, split_exists, write_listops, write_pathfinder
from ernielab.models.sparse import PRESETS
from ernielab.training.sparse import SparseTrainConfig, evaluate, load_trained, train_classifier

MODELS = {"dense": ("dense", 0.0), "bigbird": ("bigbird", 0.0), "hst": ("hst", 0.0), "hst-sar": ("hst", None)}
NAMES = {"dense": "Transformer (dense)", "bigbird": "BigBird (block+global+random)", "hst": "HST",
         "hst-sar": "HST + SAR"}


def ensure_data(args) -> None:
    if split_exists(args.task, args.data, "train"):
        return
    print(f"generating {args.task} data in {args.data}")
    if args.task == "listops":
        write_listops(args.data, ListOpsSpec(min_length=args.min_length, max_length=args.max_length,
                                             num_train=args.num_train, num_val=args.num_val,
                                             num_test=args.num_test), seed=args.data_seed)
    elif args.task == "pathfinder":
        write_pathfinder(args.data, PathfinderSpec(num_train=args.num_train, num_val=args.num_val,
                                                   num_test=args.num_test), seed=args.data_seed)
    else:
        raise SystemExit(f"no data at {args.data} (text data is user-supplied)")


def run_model(args, name: str) -> dict:
    attention, alpha = MODELS[name]
    alpha = args.sar_alpha if alpha is None else alpha
    base = PRESETS[args.preset](attention)
    max_len = args.max_len or base.max_len
    train_ds, labels = load_task(args.task, args.data, "train", max_len)
    val_ds = load_task(args.task, args.data, "val", max_len, labels)[0]
    test_ds = load_task(args.task, args.data, "test", max_len, labels)[0]
    model_cfg = base.replace(max_len=max_len, vocab_size=train_ds.vocab_size, num_classes=train_ds.num_classes,
                             sar_alpha=alpha)
    train_cfg = SparseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                                  seed=args.seed, eval_every=args.eval_every, save_every=args.eval_every)
    run_dir = args.runs / f"{args.task}-{name}"
    t0 = time.time()
    done = train_classifier(model_cfg, train_cfg, train_ds, val_ds, run_dir, stop_at=args.stop_at)["step"]
    train_s = time.time() - t0
    if done < args.steps:
        return {"model": name, "paused_at": done}
    model, _, step = load_trained(run_dir)
    val = evaluate(model, val_ds, args.eval_batch_size)
    test = evaluate(model, test_ds, args.eval_batch_size, progress=True)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_val = max((r["accuracy"] for r in history if r.get("split") == "val"), default=val["accuracy"])
    return {"model": name, "attention": attention, "sar_alpha": alpha, "step": step,
            "val_accuracy": val["accuracy"], "best_val_accuracy": best_val, "test_accuracy": test["accuracy"],
            "test_count": test["count"], "train_s_this_call": train_s,
            "params": sum(p.numel() for p in model.parameters()),
            "model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict()}


def table(results: dict) -> str:
    lines = ["| model | params | steps | val acc | test acc |", "|---|---|---|---|---|"]
    for name in MODELS:
        r = results.get(name)
        if r:
            lines.append(f"| {NAMES[name]} | {r['params']:,} | {r['step']} | {100 * r['val_accuracy']:.2f} | "
                         f"{100 * r['test_accuracy']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="listops", choices=["listops", "pathfinder", "text"])
    p.add_argument("--data", type=Path, default=None, help="default: outputs/lra/<task>")
    p.add_argument("--runs", type=Path, default=Path("outputs/sparse_lra_runs"))
    p.add_argument("--out", type=Path, default=None, help="default: outputs/sparse_lra_<task>.json")
    p.add_argument("--models", default="dense,bigbird,hst,hst-sar")
    p.add_argument("--preset", default=None, help="default: cpu-<task>")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--stop-at", type=int, default=None, help="pause after this step; rerun to continue")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--sar-alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--min-length", type=int, default=100, help="ListOps: exclusive lower length bound")
    p.add_argument("--max-length", type=int, default=512, help="ListOps: exclusive upper length bound")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.data = args.data or Path("outputs/lra") / args.task
    args.out = args.out or Path(f"outputs/sparse_lra_{args.task}.json")
    args.preset = args.preset or f"cpu-{args.task}"
    ensure_data(args)
    results = json.loads(args.out.read_text())["results"] if args.out.is_file() else {}
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {list(MODELS)}")
        result = run_model(args, name)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_config")}), flush=True)
        if "paused_at" in result:
            continue
        results[name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"task": args.task, "data": str(args.data), "results": results}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
