"""`ernielab sparse ...`: generate LRA-style data, train and evaluate dense / BigBird / HST / HST+SAR.

`train` takes a JSON config (configs/sparse/*.json: the data section, the model section and the training
settings); `eval` reads a run folder; `gen-listops` / `gen-pathfinder` write data sets. Options left out take the
defaults of the spec or config they fill, which are written once, in the dataclasses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import add_train_command, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Sparse: hierarchical sparse transformer (HST) and baselines on LRA-style tasks.")


def given(**options) -> dict:
    """The options the user gave (None = left out: the dataclass default applies)."""
    return {k: v for k, v in options.items() if v is not None}


def run_training(config) -> dict:
    from ernielab.sparse.train import train

    result = train(config)
    metrics = {k: result[k] for k in ("val", "best_val", "test") if k in result}
    if metrics:
        typer.echo(json.dumps(metrics))
    return result


add_train_command(app, "ernielab.sparse.train:SparseTrainConfig", run_training,
                  "a sequence classifier (dense / BigBird / HST / HST+SAR; val during training, test at the end)")


@app.command("gen-listops")
@user_errors
def gen_listops(out: Path = typer.Argument(..., help="folder for basic_{train,val,test}.tsv"),
                seed: Optional[int] = typer.Option(None, help="generator seed (default: the generator's)"),
                num_train: Optional[int] = typer.Option(None, help="default: the spec's"),
                num_val: Optional[int] = typer.Option(None, help="default: the spec's"),
                num_test: Optional[int] = typer.Option(None, help="default: the spec's"),
                min_length: Optional[int] = typer.Option(None, help="exclusive lower bound on tokens"),
                max_length: Optional[int] = typer.Option(None, help="exclusive upper bound on tokens"),
                max_depth: Optional[int] = typer.Option(None, help="default: the spec's"),
                max_args: Optional[int] = typer.Option(None, help="default: the spec's")):
    """ListOps per the LRA generator spec (defaults = the official 96k/2k/2k, lengths 500-2000)."""
    from ernielab.sparse.lra import ListOpsSpec, write_listops

    spec = ListOpsSpec(**given(max_depth=max_depth, max_args=max_args, min_length=min_length, max_length=max_length,
                               num_train=num_train, num_val=num_val, num_test=num_test))
    paths = write_listops(out, spec, **given(seed=seed))
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command("gen-pathfinder")
@user_errors
def gen_pathfinder(out: Path = typer.Argument(..., help="folder for pathfinder_{train,val,test}.npz"),
                   seed: Optional[int] = typer.Option(None, help="generator seed (default: the generator's)"),
                   num_train: Optional[int] = typer.Option(None, help="default: the spec's"),
                   num_val: Optional[int] = typer.Option(None, help="default: the spec's"),
                   num_test: Optional[int] = typer.Option(None, help="default: the spec's"),
                   size: Optional[int] = typer.Option(None, help="image side; sequences are size*size tokens "
                                                                 "(default: the spec's, 32)"),
                   path_length: Optional[int] = typer.Option(None, help="steps per main curve (default: 20 * size/32)"),
                   num_distractors: Optional[int] = typer.Option(None, help="default: 2 * size/32"),
                   distractor_length: Optional[int] = typer.Option(None, help="default: 10 * size/32"),
                   gap: Optional[int] = typer.Option(None, help="blank steps between dashes (default 1; 0 = solid)"),
                   marker_value: Optional[int] = typer.Option(None, help="end-dot intensity 1-255 (default 255)"),
                   match_distance: Optional[bool] = typer.Option(None, "--match-distance/--no-match-distance",
                                                                 help="negatives' dot distance drawn like "
                                                                      "positives' (default: the spec's, no)")):
    """Pathfinder-style connectivity images (two dots: joined by one dashed curve or not)."""
    from ernielab.sparse.lra import PathfinderSpec, write_pathfinder

    spec = PathfinderSpec.for_size(size or PathfinderSpec.size, path_length=path_length,
                                   num_distractors=num_distractors, distractor_length=distractor_length, gap=gap,
                                   marker_value=marker_value, match_distance=match_distance,
                                   **given(num_train=num_train, num_val=num_val, num_test=num_test))
    paths = write_pathfinder(out, spec, **given(seed=seed))
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command()
def presets():
    """List the model presets (per attention mode the same sizes)."""
    from ernielab.sparse.config import PRESETS

    typer.echo(json.dumps({name: make().to_dict() for name, make in PRESETS.items()}, indent=2))


@app.command("eval")
@user_errors
def eval_(run_dir: Path = typer.Argument(..., help="a run folder written by `train` (its output_dir)"),
          split: str = typer.Option("test", help="train | val | test (from the run's data folder)"),
          file: Optional[Path] = typer.Option(None, help="evaluate this split file instead"),
          topology: str = typer.Option("sparse", help="sparse (inference) | dense (same weights, full attention)"),
          best: bool = typer.Option(False, help="the model of the best validation accuracy (best/), not the last "
                                                "checkpoint"),
          batch_size: Optional[int] = typer.Option(None, help="default: the run's eval_batch_size"),
          threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)")):
    """Accuracy and loss of a trained run on a split or a file."""
    from ernielab.sparse.lra import SPLITS, load_task
    from ernielab.sparse.model import TOPOLOGIES
    from ernielab.sparse.train import SparseTrainConfig, evaluate, load_trained

    if topology not in TOPOLOGIES:
        raise ValueError(f"--topology must be one of {TOPOLOGIES}, got {topology!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    set_threads(threads)
    config_file = run_dir / "train_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a `sparse train` run folder?")
    run = SparseTrainConfig.load(config_file, strict=False)
    model, cfg, step = load_trained(run_dir, best=best)
    ds, _ = load_task(run.data.task, file or run.data.path, split, cfg.max_len, run.data.labels or None)
    if ds.num_classes != cfg.num_classes:
        raise ValueError(f"data has {ds.num_classes} classes, the model {cfg.num_classes}")
    metrics = evaluate(model, ds, batch_size or run.eval_batch_size, topology=topology, progress=True)
    typer.echo(json.dumps({"run_dir": str(run_dir), "step": step, "checkpoint": "best" if best else "last",
                           "split": str(file or split), "topology": topology, **metrics}))
