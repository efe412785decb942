"""`ernielab aesthetic ...`: build a tiered benchmark, train a Bradley-Terry aesthetic head (`train CONFIG.json`),
score, evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, add_train_command, parse_sets, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Image-Aes-style aesthetic scorer: tiered benchmark, Bradley-Terry training, SRCC/PLCC.")


@user_errors
def make_benchmark(out: Path = typer.Argument(..., help="benchmark root (train/ and test/ in ERIA-1K layout)"),
                   n_train: Optional[int] = typer.Option(None, help="train images (default: TieredBenchmarkConfig's)"),
                   n_test: Optional[int] = typer.Option(None, help="test images (default: TieredBenchmarkConfig's)"),
                   image_size: Optional[int] = typer.Option(None, help="pixels (default: TieredBenchmarkConfig's)"),
                   seed: Optional[int] = typer.Option(None, help="default: TieredBenchmarkConfig's"),
                   judge_noise: Optional[float] = typer.Option(
                       None, help="judge's Bradley-Terry temperature (0 = noiseless; default: TieredBenchmarkConfig's)"),
                   set_: list[str] = typer.Option([], "--set", help="other TieredBenchmarkConfig fields, KEY=VALUE")):
    """Degraded shapes-world images, ranked by a Swiss tournament of a noisy judge, tiered 1-10."""
    from ernielab.aesthetic.tiered import TieredBenchmarkConfig, build_benchmark

    given = dict(n_train=n_train, n_test=n_test, image_size=image_size, seed=seed, judge_noise=judge_noise)
    cfg = TieredBenchmarkConfig.from_dict({**{k: v for k, v in given.items() if v is not None},
                                           **parse_sets(set_, TieredBenchmarkConfig)})
    typer.echo(json.dumps(build_benchmark(out, cfg)["splits"], indent=2))


app.command("benchmark")(make_benchmark)
app.command("make-benchmark", hidden=True)(make_benchmark)  # the command's earlier name


def run_training(cfg) -> dict:
    """`ernielab aesthetic train CONFIG.json`: features (cached), the head through the engine, calibration."""
    from ernielab.aesthetic.train import train_from_benchmark

    return train_from_benchmark(cfg)


add_train_command(app, "ernielab.aesthetic.train:AestheticTrainConfig", run_training,
                  "the aesthetic head on a benchmark's pairwise judgments")


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
