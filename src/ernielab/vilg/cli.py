"""`ernielab vilg ...`: ERNIE-ViLG 2.0 training. `train CONFIG` runs any ViLG training config (stage 1, or a
stage 2 whose mode.init_from names stage 1); `stage2 CONFIG` turns a finished stage-1 run into N experts and
trains them (configs/vilg/stage2.json: one config per link of the chain)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import (
    add_train_command,
    check_output_dir,
    load_config,
    run_options,
    set_threads,
    train_summary,
    user_errors,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-ViLG 2.0: mixture of denoising experts and knowledge-enhanced training.")


def run(cfg) -> dict:
    from ernielab.vilg.train import VilgTrainer

    return VilgTrainer(cfg).train()


add_train_command(app, "ernielab.vilg.train:VilgTrainConfig", run,
                  "a ViLG 2.0 model (MoDE in `mode`, knowledge enhancement in `knowledge`)")


@app.command("stage2")
@user_errors
def stage2(config: Path = typer.Argument(..., help="stage-2 config JSON (see configs/vilg/stage2.json)"),
           set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set experts=2"),
           output_dir: Optional[str] = typer.Option(None, "--output-dir", help="override output_dir"),
           fresh: bool = typer.Option(False, "--fresh", help="clear the stage-2 run's checkpoints and start over"),
           threads: int = typer.Option(0, help="torch CPU threads (0 = torch's default)")):
    """Copy a finished stage-1 run (weights, EMA, Adam moments) into N experts and train them (resumes)."""
    from ernielab.vilg.train import Stage2Config

    cfg = run_options(load_config(Stage2Config, config, set_).train_config(), output_dir, fresh)
    check_output_dir(Path(cfg.output_dir), "output_dir")
    set_threads(threads)
    typer.echo(train_summary(run(cfg)))
