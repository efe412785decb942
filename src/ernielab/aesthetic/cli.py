"""`ernielab aesthetic ...`: build a tiered benchmark, train a Bradley-Terry aesthetic head, score, evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, parse_sets, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Image-Aes-style aesthetic scorer: tiered benchmark, Bradley-Terry training, SRCC/PLCC.")


@app.command("make-benchmark")
@user_errors
def make_benchmark(out: Path = typer.Argument(..., help="benchmark root (train/ and test/ in ERIA-1K layout)"),
                   n_train: int = typer.Option(1000), n_test: int = typer.Option(500),
                   image_size: int = typer.Option(32), seed: int = typer.Option(0),
                   judge_noise: float = typer.Option(0.2, help="judge's Bradley-Terry temperature (0 = noiseless)"),
                   set_: list[str] = typer.Option([], "--set", help="other TieredBenchmarkConfig fields, KEY=VALUE")):
    """Degraded shapes-world images, ranked by a Swiss tournament of a noisy judge, tiered 1-10."""
    from ernielab.aesthetic.tiered import TieredBenchmarkConfig, build_benchmark

    fields = dict(n_train=n_train, n_test=n_test, image_size=image_size, seed=seed, judge_noise=judge_noise)
    cfg = TieredBenchmarkConfig.from_dict({**fields, **parse_sets(set_)})
    typer.echo(json.dumps(build_benchmark(out, cfg)["splits"], indent=2))


@app.command()
@user_errors
def train(benchmark: Path = typer.Argument(..., help="root made by make-benchmark"),
          output_dir: Path = typer.Option(Path("runs/aesthetic/train"), help="checkpoints, features cache, scorer/"),
          backbone: str = typer.Option("inception", help="inception | pixels:<k> | hf:<model folder>"),
          hidden: int = typer.Option(128, help="MLP width (0 = linear head)"),
          steps: int = typer.Option(1500), lr: float = typer.Option(1e-3), seed: int = typer.Option(0),
          threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)")):
    """Train the head on the train split's pairwise judgments (resumes from output_dir)."""
    from ernielab.aesthetic.train import AestheticTrainConfig, train_from_benchmark

    set_threads(threads)
    cfg = AestheticTrainConfig(benchmark=str(benchmark), output_dir=str(output_dir), backbone=backbone,
                               hidden=hidden, steps=steps, lr=lr, seed=seed)
    _, report = train_from_benchmark(cfg)
    typer.echo(json.dumps(report, indent=2))


@app.command("eval")
@user_errors
def eval_(benchmark: Path = typer.Argument(..., help="root, split folder or JSON of an ERIA-1K-layout split"),
          model: Optional[Path] = typer.Option(None, help="scorer folder (default: the shipped one)"),
          split: str = typer.Option("test"),
          out: Optional[Path] = typer.Option(None, help="write the report JSON here"),
          threads: int = typer.Option(0)):
    """SRCC and PLCC between the scorer and the tiers, and the mean score per tier."""
    from ernielab.aesthetic.scorer import load_scorer
    from ernielab.aesthetic.train import evaluate_benchmark

    set_threads(threads)
    report = evaluate_benchmark(load_scorer(model), benchmark, split)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


@app.command()
@user_errors
def score(images: list[Path] = typer.Argument(..., help="image files"),
          model: Optional[Path] = typer.Option(None, help="scorer folder (default: the shipped one)"),
          threads: int = typer.Option(0)):
    """Print one `score<TAB>path` line per image (higher = better, about 1-10)."""
    from ernielab.aesthetic.scorer import load_scorer
    from ernielab.aesthetic.tiered import load_images

    set_threads(threads)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise UserError(f"image not found: {missing[0]}")
    scores = load_scorer(model).score(load_images(images))
    for path, value in zip(images, scores.tolist()):
        typer.echo(f"{value:.3f}\t{path}")
