"""`ernielab distill CONFIG`: few-step CFG-free student by distribution matching (DMD2 style; MT-DMD)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import load_config, run_options, set_threads, user_errors


@user_errors
def distill(config: Path = typer.Argument(..., help="distillation config JSON (see configs/distill_*.json)"),
            set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set steps=100"),
            output_dir: Optional[str] = typer.Option(None, help="override output_dir"),
            fresh: bool = typer.Option(False, help="ignore existing checkpoints (do not resume)"),
            threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)")):
    """Distil a CFG teacher (or a sigma-weighted mix of teachers) into a few-step student; resumes by default.

    The student is written to OUTPUT_DIR/student, a pipeline folder for `generate` / `eval`."""
    from ernielab.turbo.distill import DistillTrainer

    set_threads(threads)
    from ernielab.turbo.distill import DistillConfig

    cfg = load_config(DistillConfig, config, set_)
    cfg = run_options(cfg, output_dir, fresh)
    result = DistillTrainer(cfg).train()
    typer.echo(f"distilled to step {result['step']} in {result['elapsed_s']:.0f}s; student at {result['student']}")
