"""`ernielab turbo train CONFIG`: few-step CFG-free student by distribution matching (DMD2 style; MT-DMD).

The student is written to OUTPUT_DIR/student, a pipeline folder for `generate` / `image eval`; configs are in
configs/turbo/."""
from __future__ import annotations

import typer

from ernielab.core.cli import add_train_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Image-Turbo: distil a CFG teacher (or a sigma-weighted mix of teachers) into a "
                       "few-step, CFG-free student (DMD / MT-DMD).")


@app.callback()
def turbo() -> None:
    """ERNIE-Image-Turbo: DMD / MT-DMD distillation into a few-step, CFG-free student (OUTPUT_DIR/student)."""


def run(config) -> dict:
    from ernielab.turbo.distill import DistillTrainer

    return DistillTrainer(config).train()


add_train_command(app, "ernielab.turbo.distill:DistillConfig", run,
                  "a few-step, CFG-free student (OUTPUT_DIR/student) by distribution matching")

