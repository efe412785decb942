"""Accuracy of dense Transformer, BigBird, HST and HST+SAR on LRA-style tasks at one equal CPU budget.

Every model gets the same preset (width, depth, heads, MLP), the same data, batch size, steps, learning
rate schedule and seed; only the attention topology (and, for HST+SAR, the loss) differs. Runs resume
from their checkpoints and results are merged into --out, so models can be trained one per call:

    python benchmarks/sparse_lra.py --task listops --models dense --threads 1
    python benchmarks/sparse_lra.py --task listops --models bigbird,hst,hst-sar --threads 1
    python benchmarks/sparse_lra.py --task listops --seed 1 --threads 1     # another training seed
    python benchmarks/sparse_lra.py --task listops --models none            # only print the tables

--setting NAME fills in a named bundle of defaults (data, lengths, split sizes, budget, run and result
paths); flags given explicitly still win. `listops-len128` is the short-sequence ListOps level of
docs/sparse.md, the one where the models learn past the outer-operator rule at a CPU budget:

    python benchmarks/sparse_lra.py --setting listops-len128 --seed 0 --threads 1   # then --seed 1 ... 4

--seed N (N > 0) trains into `<runs>/<task>-<model>-seed<N>`; seed 0 keeps the plain `<task>-<model>`
folders. The seed drives weight initialisation, batch order and dropout (the data and BigBird's random
block pattern stay fixed). Results are stored per seed in --out, and a mean +- std table across the
seeds present is printed.

Missing data is generated first (ListOps: official generator spec with the lengths given here;
Pathfinder: the Pathfinder-style generator, 32x32 unless --image-size and the easier-level flags say
otherwise); existing data made with other generator settings is refused. Baselines that need no
training are printed and stored too: ListOps' outer-operator rule and, when the end dots have their
own intensity, Pathfinder's best dot-distance threshold. The 16x16 Pathfinder level of docs/sparse.md:

    python benchmarks/sparse_lra.py --task pathfinder --image-size 16 --gap 0 --marker-value 128 \
        --match-distance --num-train 10000 --data outputs/lra/pathfinder16-matched --max-len 256 \
        --set pos_encoding=sincos-2d --set image_width=16 --steps 1500 --batch-size 32 --lr 1e-3 --threads 1

Each run is `ernielab sparse train` with one of configs/sparse/*.json (the same settings; a test checks that
the configs match the settings stored with the results in benchmarks/results/sparse/). Everything is written
under outputs/ unless --runs / --out say otherwise. A smoke run (tiny data, 4 steps per model, seconds):

    python benchmarks/sparse_lra.py --setting smoke        # -> outputs/smoke/sparse_lra.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ernielab.core.cli import parse_sets
from ernielab.sparse.config import PRESETS
from ernielab.sparse.lra import ListOpsSpec, PathfinderSpec, SparseDataConfig, ensure_data, load_task
from ernielab.sparse.train import BEST_DIR, SparseTrainConfig, evaluate, load_trained, train

MODELS = {"dense": ("dense", 0.0), "bigbird": ("bigbird", 0.0), "hst": ("hst", 0.0), "hst-sar": ("hst", None)}
# Named bundles of defaults. listops-len128: the official generator spec with lengths 20-128 (exclusive)
# and 20k training examples. At lengths 100-512 no model left the outer-operator plateau in 1,500 steps,
# at 100-256 dense did not in 2,500-4,000 (docs/sparse.md); here all four do within 500-1,500 steps.
SETTINGS = {
    "listops-len128": dict(task="listops", data=Path("outputs/lra/listops-len128"), min_length=20, max_length=128,
                           num_train=20000, num_val=500, num_test=1000, max_len=128, steps=6000, batch_size=32,
                           lr=1e-3, warmup_steps=200, runs=Path("outputs/sparse_lra_runs_len128"),
                           out=Path("outputs/sparse_lra_listops_len128.json")),
    # the same lengths with a quarter of the data (38 epochs in 6,000 steps) and blocks of 8, so that the
    # models memorise the training set and sparsity binds: the regime where a regulariser can show.
    # 4,000 test examples (one standard error about 0.75 points); train and val are the first 5,500 rows
    # of the generator stream, whatever the test size
    "listops-len128-5k": dict(task="listops", data=Path("outputs/lra/listops-len128-5k-test4k"), min_length=20,
                              max_length=128, num_train=5000, num_val=500, num_test=4000, max_len=128, steps=6000,
                              batch_size=32, lr=1e-3, warmup_steps=200, set=["block_size=8"],
                              runs=Path("outputs/sparse_lra_runs_len128_5k"),
                              out=Path("outputs/sparse_lra_listops_len128_5k.json")),
    # a few seconds end to end: tiny ListOps, the test-size model, 4 steps per model
    "smoke": dict(task="listops", data=Path("outputs/smoke/lra/listops"), min_length=4, max_length=40, num_train=64,
                  num_val=16, num_test=16, max_len=64, preset="tiny", steps=4, batch_size=8, warmup_steps=1,
                  eval_every=2, runs=Path("outputs/smoke/sparse_lra_runs"), out=Path("outputs/smoke/sparse_lra.json")),
}
NAMES = {"dense": "Transformer (dense)", "bigbird": "BigBird (block+global+random)", "hst": "HST",
         "hst-sar": "HST + SAR"}


def data_spec(args):
    """The generator spec the command line asks for (None for user-supplied text)."""
    if args.task == "listops":
        return ListOpsSpec(min_length=args.min_length, max_length=args.max_length, num_train=args.num_train,
                           num_val=args.num_val, num_test=args.num_test)
    if args.task == "pathfinder":
        return PathfinderSpec.for_size(args.image_size, path_length=args.path_length, gap=args.gap,
                                       num_distractors=args.num_distractors, marker_value=args.marker_value,
                                       match_distance=args.match_distance or None,
                                       num_train=args.num_train, num_val=args.num_val, num_test=args.num_test)
    return None


def data_config(args) -> SparseDataConfig:
    """The data section every run's config gets: missing data is generated with the spec the command line asks
    for, and existing data made with other generator settings is refused (ensure_data), so a table is never
    silently computed on a different variant than the command states."""
    spec = data_spec(args)
    return SparseDataConfig(task=args.task, path=str(args.data), seed=args.data_seed,
                            listops=spec if args.task == "listops" else None,
                            pathfinder=spec if args.task == "pathfinder" else None)


def marker_distances(images: np.ndarray, marker_value: int) -> np.ndarray:
    """Distance between the centres of the two end dots of each image (0 when the dots overlap)."""
    from scipy import ndimage

    out = np.zeros(len(images))
    for i, image in enumerate(images):
        parts, count = ndimage.label(image == marker_value)
        if count >= 2:
            centres = np.array(ndimage.center_of_mass(image == marker_value, parts, [1, 2]))
            out[i] = np.linalg.norm(centres[0] - centres[1])
    return out


def dot_distance_baseline(args) -> dict | None:
    """Accuracy of one threshold on the end-dot distance (fit on train, scored on test): how far the
    shortcut "dots close together = same curve" goes without tracing any curve. Needs distinct dots."""
    spec = data_spec(args)
    if args.task != "pathfinder" or spec.marker_value == 255:
        return None
    split = {}
    for name in ("train", "test"):
        with np.load(args.data / f"pathfinder_{name}.npz") as arrays:
            split[name] = marker_distances(arrays["images"], spec.marker_value), arrays["labels"]
    dist, labels = split["train"]
    candidates = np.unique(dist)
    train_acc = [((dist <= t) == labels).mean() for t in candidates]
    threshold = float(candidates[int(np.argmax(train_acc))])
    dist, labels = split["test"]
    return {"threshold": threshold, "train_accuracy": float(max(train_acc)),
            "test_accuracy": float(((dist <= threshold) == labels).mean())}


def outer_operator_baseline(args) -> dict | None:
    """ListOps accuracy of "answer the most common train label of the outermost operator" (e.g. MAX -> 9):
    the level a model reaches by reading the first operator and nothing else."""
    if args.task != "listops":
        return None
    from collections import Counter, defaultdict

    from ernielab.sparse.lra import LISTOPS_FILES, read_tsv

    def rows(split):
        return [(source.replace("(", " ").split()[0], label) for _, source, label in
                read_tsv(args.data / LISTOPS_FILES[split])]

    counts = defaultdict(Counter)
    for op, label in rows("train"):
        counts[op][label] += 1
    rule = {op: c.most_common(1)[0][0] for op, c in counts.items()}
    majority = Counter(label for _, label in rows("train")).most_common(1)[0][0]
    out = {"rule": rule}
    for split in ("val", "test"):
        data = rows(split)
        out[f"{split}_accuracy"] = sum(rule.get(op) == label for op, label in data) / len(data)
        out[f"{split}_majority_accuracy"] = sum(label == majority for _, label in data) / len(data)
    return out


def root_digits(tokens: list[str]) -> list[int]:
    """The digits that are direct arguments of the outermost operator (bracket depth 1)."""
    depth, digits = 0, []
    for tok in tokens:
        if tok.startswith("["):
            depth += 1
        elif tok == "]":
            depth -= 1
        elif depth == 1:
            digits.append(int(tok))
    return digits


def root_digits_baseline(args) -> dict | None:
    """ListOps accuracy of a lookup table from (outermost operator, max and min of its own digit
    arguments) to the most common train label: what a model gets by reading the root's direct digits
    and skipping every nested operator. A level between the outer-operator rule and solving the task."""
    if args.task != "listops":
        return None
    from collections import Counter, defaultdict

    from ernielab.sparse.lra import LISTOPS_FILES, read_tsv

    def rows(split):
        out = []
        for _, source, label in read_tsv(args.data / LISTOPS_FILES[split]):
            tokens = source.replace("(", " ").replace(")", " ").split()
            digits = root_digits(tokens) or [-1]
            out.append(((tokens[0], max(digits), min(digits)), label))
        return out

    counts = defaultdict(Counter)
    for key, label in rows("train"):
        counts[key][label] += 1
    majority = Counter(label for _, label in rows("train")).most_common(1)[0][0]
    table = {key: c.most_common(1)[0][0] for key, c in counts.items()}
    out = {"table_size": len(table)}
    for split in ("val", "test"):
        data = rows(split)
        out[f"{split}_accuracy"] = sum(table.get(key, majority) == label for key, label in data) / len(data)
    return out


def run_dir_for(args, name: str) -> Path:
    """Seed 0 keeps the original folder names, so runs made before --seed existed stay valid."""
    suffix = f"-seed{args.seed}" if args.seed else ""
    return args.runs / f"{args.task}-{name}{suffix}"


def train_config(args, name: str) -> SparseTrainConfig:
    """The config of one model's run (what `ernielab sparse train` gets from configs/sparse/*.json)."""
    attention, alpha = MODELS[name]
    alpha = args.sar_alpha if alpha is None else alpha
    base = PRESETS[args.preset](attention)
    max_len = args.max_len or base.max_len
    train_ds, _ = load_task(args.task, args.data, "train", max_len)
    model_cfg = base.replace(max_len=max_len, vocab_size=train_ds.vocab_size, num_classes=train_ds.num_classes,
                             sar_alpha=alpha, **parse_sets(args.set))
    return SparseTrainConfig(model=model_cfg, data=data_config(args), output_dir=str(run_dir_for(args, name)),
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
                             eval_every=args.eval_every, save_every=args.eval_every,
                             eval_batch_size=args.eval_batch_size, max_minutes=args.max_minutes)


def run_model(args, name: str) -> dict:
    train_cfg = train_config(args, name)
    model_cfg, run_dir = train_cfg.model, Path(train_cfg.output_dir)
    t0 = time.time()
    result = train(train_cfg)
    train_s = time.time() - t0
    if result["stopped"]:
        return {"model": name, "paused_at": result["step"]}
    model, _, step = load_trained(run_dir)
    data = train_cfg.data
    val = evaluate(model, load_task(data.task, data.path, "val", model_cfg.max_len, data.labels or None)[0],
                   args.eval_batch_size)
    test_ds = load_task(data.task, data.path, "test", model_cfg.max_len, data.labels or None)[0]
    test = evaluate(model, test_ds, args.eval_batch_size, progress=True)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_val = max((r["eval"]["accuracy"] for r in history if r.get("eval")), default=val["accuracy"])
    at_best = {}
    if (run_dir / BEST_DIR).is_dir():  # kept at every validation (a run without a val split has none)
        best_model, _, best_step = load_trained(run_dir, best=True)
        at_best = {"best_val_step": best_step,
                   "test_accuracy_at_best_val": evaluate(best_model, test_ds, args.eval_batch_size)["accuracy"]}
    # wall time of the training call that reached the last logged step (the whole run unless it was resumed)
    train_elapsed = next((r["elapsed_s"] for r in reversed(history) if "elapsed_s" in r), None)
    return {"model": name, "attention": model_cfg.attention, "sar_alpha": model_cfg.sar_alpha, "step": step,
            "val_accuracy": val["accuracy"], "best_val_accuracy": best_val, "test_accuracy": test["accuracy"],
            "test_count": test["count"], **at_best, "train_s_this_call": train_s,
            "train_elapsed_s_last_call": train_elapsed,
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5


def seed_table(by_seed: dict[str, dict]) -> str:
    """Per-seed test accuracies and mean +- std over the seeds each model has finished."""
    seeds = sorted(by_seed, key=int)
    head = "| model | " + " | ".join(f"test seed {s}" for s in seeds) + " | test mean +- std | val mean +- std | n |"
    head += " test at best val, mean +- std (n) |"
    lines = [head, "|" + "---|" * (len(seeds) + 5)]
    for name in MODELS:
        runs = [by_seed[s][name] for s in seeds if name in by_seed[s]]
        if not runs:
            continue
        cells = [f"{100 * by_seed[s][name]['test_accuracy']:.2f}" if name in by_seed[s] else "-" for s in seeds]
        test_m, test_s = mean_std([100 * r["test_accuracy"] for r in runs])
        val_m, val_s = mean_std([100 * r["val_accuracy"] for r in runs])
        at_best = [100 * r["test_accuracy_at_best_val"] for r in runs if "test_accuracy_at_best_val" in r]
        best_cell = "%.2f +- %.2f (%d)" % (*mean_std(at_best), len(at_best)) if at_best else "-"
        lines.append(f"| {NAMES[name]} | " + " | ".join(cells) +
                     f" | {test_m:.2f} +- {test_s:.2f} | {val_m:.2f} +- {val_s:.2f} | {len(runs)} | {best_cell} |")
    return "\n".join(lines)


def load_results(path: Path) -> dict[str, dict]:
    """{seed: {model: result}}; files written before --seed existed hold seed 0 under "results"."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if "results_by_seed" in saved:
        return saved["results_by_seed"]
    return {"0": saved.get("results", {})}


def write_summary(args, baselines: dict, by_seed: dict) -> None:
    spec = data_spec(args)
    summary = {"task": args.task, "data": str(args.data), "data_spec": spec.to_dict() if spec else None,
               **baselines, "results_by_seed": by_seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                   help="named bundle of defaults (explicit flags override it)")
    p.add_argument("--task", default="listops", choices=["listops", "pathfinder", "text"])
    p.add_argument("--data", type=Path, default=None, help="default: outputs/lra/<task>")
    p.add_argument("--runs", type=Path, default=Path("outputs/sparse_lra_runs"))
    p.add_argument("--out", type=Path, default=None, help="default: outputs/sparse_lra_<task>.json")
    p.add_argument("--models", default="dense,bigbird,hst,hst-sar", help="comma list, or 'none' to only print")
    p.add_argument("--preset", default=None, help="default: cpu-<task>")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="pause each run after this much training time (0 = no limit); rerun to continue")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--sar-alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="training seed; N > 0 uses <task>-<model>-seed<N> folders")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--min-length", type=int, default=100, help="ListOps: exclusive lower length bound")
    p.add_argument("--max-length", type=int, default=512, help="ListOps: exclusive upper length bound")
    p.add_argument("--image-size", type=int, default=32, help="Pathfinder: image side (tokens = side^2)")
    p.add_argument("--path-length", type=int, default=None, help="Pathfinder: main-curve steps (default 20*side/32)")
    p.add_argument("--num-distractors", type=int, default=None, help="Pathfinder: default 2*side/32")
    p.add_argument("--gap", type=int, default=None, help="Pathfinder: blank steps between dashes (default 1)")
    p.add_argument("--marker-value", type=int, default=None, help="Pathfinder: end-dot intensity (default 255)")
    p.add_argument("--match-distance", action="store_true",
                   help="Pathfinder: negatives' end-dot distance drawn like positives' (no distance shortcut)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override for all models, e.g. --set depth=4 --set pos_encoding=sincos-2d")
    setting = p.parse_known_args()[0].setting
    if setting:  # lists are copied: argparse appends to a list default in place
        p.set_defaults(**{k: list(v) if isinstance(v, list) else v for k, v in SETTINGS[setting].items()})
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.data = args.data or Path("outputs/lra") / args.task
    args.out = args.out or Path(f"outputs/sparse_lra_{args.task}.json")
    args.preset = args.preset or f"cpu-{args.task}"
    try:
        ensure_data(data_config(args))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    baselines = {"dot_distance_baseline": dot_distance_baseline(args),
                 "outer_operator_baseline": outer_operator_baseline(args),
                 "root_digits_baseline": root_digits_baseline(args)}
    baselines = {k: v for k, v in baselines.items() if v}
    for name, baseline in baselines.items():
        print(f"{name}: {json.dumps(baseline)}")
    by_seed = load_results(args.out)
    names = [] if args.models == "none" else args.models.split(",")
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {list(MODELS)}")
        result = run_model(args, name)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_config")}), flush=True)
        if "paused_at" in result:
            continue
        by_seed.setdefault(str(args.seed), {})[name] = result
        write_summary(args, baselines, by_seed)
    if by_seed:
        write_summary(args, baselines, by_seed)  # also refreshes the baselines of an older file
    print()
    if str(args.seed) in by_seed:
        print(f"seed {args.seed}:")
        print(table(by_seed[str(args.seed)]))
        print()
    if by_seed:
        print(seed_table(by_seed))


if __name__ == "__main__":
    main()
