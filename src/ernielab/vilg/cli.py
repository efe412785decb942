"""`ernielab vilg ...`: ERNIE-ViLG 2.0 training. `train CONFIG` runs any ViLG training config (stage 1, or a
stage 2 whose mode.init_from names stage 1); `stage2 CONFIG` turns a finished stage-1 run into N experts and
trains them (configs/vilg/stage2.json: one config per link of the chain)."""
from __future__ import annotations


import typer

from ernielab.core.cli import add_train_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-ViLG 2.0: mixture of denoising experts and knowledge-enhanced training.")


def run(cfg) -> dict:
    from ernielab.vilg.train import VilgTrainer

    return VilgTrainer(cfg).train()


add_train_command(app, "ernielab.vilg.train:VilgTrainConfig", run,
                  "a ViLG 2.0 model (MoDE in `mode`, knowledge enhancement in `knowledge`)")


add_train_command(app, "ernielab.vilg.train:Stage2Config", run,
                  "N experts from a finished stage-1 run (weights, EMA, Adam moments copied)", name="stage2",
                  prepare=lambda stage2: stage2.train_config())
