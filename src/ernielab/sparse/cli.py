"""`ernielab sparse ...`: generate LRA-style data, train and evaluate dense / BigBird / HST / HST+SAR."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import parse_sets, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Sparse: hierarchical sparse transformer (HST) and baselines on LRA-style tasks.")

TASK_FILE = "task.json"


@app.command("gen-listops")
@user_errors
def gen_listops(out: Path = typer.Argument(..., help="folder for basic_{train,val,test}.tsv"),
                seed: int = typer.Option(0),
                num_train: int = typer.Option(96_000), num_val: int = typer.Option(2_000),
                num_test: int = typer.Option(2_000),
                min_length: int = typer.Option(500, help="exclusive lower bound on tokens"),
                max_length: int = typer.Option(2000, help="exclusive upper bound on tokens"),
                max_depth: int = typer.Option(10), max_args: int = typer.Option(10)):
    """ListOps per the LRA generator spec (defaults = the official 96k/2k/2k, lengths 500-2000)."""
    from ernielab.sparse.lra import ListOpsSpec, write_listops

    spec = ListOpsSpec(max_depth=max_depth, max_args=max_args, min_length=min_length, max_length=max_length,
                       num_train=num_train, num_val=num_val, num_test=num_test)
    paths = write_listops(out, spec, seed)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command("gen-pathfinder")
@user_errors
def gen_pathfinder(out: Path = typer.Argument(..., help="folder for pathfinder_{train,val,test}.npz"),
                   seed: int = typer.Option(0),
                   num_train: int = typer.Option(20_000), num_val: int = typer.Option(2_000),
                   num_test: int = typer.Option(2_000),
                   size: int = typer.Option(32, help="image side; sequences are size*size tokens"),
                   path_length: Optional[int] = typer.Option(None, help="steps per main curve (default: 20 * size/32)"),
                   num_distractors: Optional[int] = typer.Option(None, help="default: 2 * size/32"),
                   distractor_length: Optional[int] = typer.Option(None, help="default: 10 * size/32"),
                   gap: Optional[int] = typer.Option(None, help="blank steps between dashes (default 1; 0 = solid)"),
                   marker_value: Optional[int] = typer.Option(None, help="end-dot intensity 1-255 (default 255)"),
                   match_distance: bool = typer.Option(False, help="negatives' dot distance drawn like positives'")):
    """Pathfinder-style connectivity images (two dots: joined by one dashed curve or not)."""
    from ernielab.sparse.lra import PathfinderSpec, write_pathfinder

    spec = PathfinderSpec.for_size(size, path_length=path_length, num_distractors=num_distractors,
                                   distractor_length=distractor_length, gap=gap, marker_value=marker_value,
                                   match_distance=match_distance, num_train=num_train, num_val=num_val, num_test=num_test)
    paths = write_pathfinder(out, spec, seed)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command()
def presets():
    """List the model presets (per attention mode the same sizes)."""
    from ernielab.sparse.config import PRESETS

    typer.echo(json.dumps({name: make().to_dict() for name, make in PRESETS.items()}, indent=2))


@app.command()
@user_errors
def train(task: str = typer.Option(..., help="listops | pathfinder | text"),
          data: Path = typer.Option(..., help="task folder (split files) or, for text, a train TSV"),
          run_dir: Path = typer.Option(..., help="output folder: checkpoints, metrics.jsonl, results.json"),
          attention: str = typer.Option("hst", help="dense | bigbird | hst"),
          sar_alpha: float = typer.Option(0.0, help="HST only: SAR weight (0 = plain HST)"),
          preset: str = typer.Option("cpu-listops", help="model size preset (see `presets`)"),
          max_len: Optional[int] = typer.Option(None, help="truncate / model max length (default: preset's)"),
          set_: list[str] = typer.Option([], "--set", help="model config override, e.g. --set dim=128"),
          steps: int = typer.Option(1000), batch_size: int = typer.Option(32), lr: float = typer.Option(1e-3),
          weight_decay: float = typer.Option(0.01), warmup_steps: int = typer.Option(100),
          seed: int = typer.Option(0), eval_every: int = typer.Option(200), save_every: int = typer.Option(200),
          resume: bool = typer.Option(True, help="continue from run_dir's latest checkpoint"),
          stop_at: Optional[int] = typer.Option(None, help="pause after this step; rerun to continue"),
          threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)")):
    """Train a classifier; evaluates val during training and the test split (if present) at the end."""
    from ernielab.sparse.config import PRESETS
    from ernielab.sparse.lra import load_task, split_exists
    from ernielab.sparse.train import SparseTrainConfig, evaluate, train_classifier

    set_threads(threads)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[preset](attention)
    length = max_len or base.max_len
    train_ds, labels = load_task(task, data, "train", length)
    val_ds = load_task(task, data, "val", length, labels)[0] if split_exists(task, data, "val") else None
    model_cfg = base.replace(max_len=length, vocab_size=train_ds.vocab_size, num_classes=train_ds.num_classes,
                             sar_alpha=sar_alpha, **parse_sets(set_))
    train_cfg = SparseTrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                  warmup_steps=warmup_steps, seed=seed, eval_every=eval_every,
                                  save_every=save_every)
    result = train_classifier(model_cfg, train_cfg, train_ds, val_ds, run_dir, resume=resume, stop_at=stop_at)
    (run_dir / TASK_FILE).write_text(json.dumps({"task": task, "data": str(data), "labels": labels}, indent=2))
    if result["step"] == steps and split_exists(task, data, "test"):
        from ernielab.sparse.train import load_trained

        model, _, _ = load_trained(run_dir)
        result["test"] = evaluate(model, load_task(task, data, "test", length, labels)[0], progress=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result))


@app.command("eval")
@user_errors
def eval_(run_dir: Path = typer.Option(..., help="a folder written by `train`"),
          split: str = typer.Option("test", help="train | val | test (from the training data folder)"),
          file: Optional[Path] = typer.Option(None, help="evaluate this split file instead"),
          topology: str = typer.Option("sparse", help="sparse (inference) | dense (same weights, full attention)"),
          best: bool = typer.Option(False, help="the checkpoint of the best validation accuracy, not the last"),
          batch_size: int = typer.Option(64),
          threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)")):
    """Accuracy and loss of a trained run on a split or a file."""
    from ernielab.sparse.lra import load_task
    from ernielab.sparse.train import evaluate, load_trained

    set_threads(threads)
    task_path = run_dir / TASK_FILE
    if not task_path.is_file():
        raise FileNotFoundError(f"{task_path} not found: is {run_dir} a finished `train` run?")
    info = json.loads(task_path.read_text())
    model, cfg, step = load_trained(run_dir, best=best)
    ds, _ = load_task(info["task"], file or info["data"], split, cfg.max_len, info.get("labels"))
    if ds.num_classes != cfg.num_classes:
        raise ValueError(f"data has {ds.num_classes} classes, the model {cfg.num_classes}")
    metrics = evaluate(model, ds, batch_size, topology=topology, progress=True)
    typer.echo(json.dumps({"run_dir": str(run_dir), "step": step, "checkpoint": "best" if best else "last",
                           "split": str(file or split), "topology": topology, **metrics}))
