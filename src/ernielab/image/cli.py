"""ERNIE-Image's commands: `ernielab image train | eval | export | info` (top-level `generate` lives in cli/main.py,
which may also rewrite prompts with the enhancer family)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, add_train_command, check_output_dir, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE-Image: train, evaluate and export text-to-image models")


def run_training(config) -> dict:
    from ernielab.image.train import Trainer

    return Trainer(config).train()


add_train_command(app, "ernielab.image.train:TrainConfig", run_training, "a text-to-image transformer by flow matching")


@app.command("eval")
@user_errors
def eval_(model: Optional[Path] = typer.Option(None, help="pipeline folder (default: the bundled model)"),
          data: str = typer.Option("shapes", help="shapes | mnist | folder"),
          data_path: str = typer.Option("", help="folder/JSONL for --data folder"),
          image_size: Optional[int] = typer.Option(None, help="default: the model's"),
          n_fid: int = typer.Option(500, help="held-out images for FID/KID (0 = skip)"),
          n_align: int = typer.Option(100, help="prompts per alignment category"),
          seed: int = typer.Option(0),
          steps: Optional[int] = typer.Option(None),
          guidance: Optional[float] = typer.Option(None),
          shift: Optional[float] = typer.Option(None),
          n_paraphrase: int = typer.Option(0, help="shapes: template prompts and their held-out paraphrase twins "
                                                   "per kind (0 = skip)"),
          holdout: Optional[list[str]] = typer.Option(None, metavar="'COLOR SHAPE RELATION'",
                                                      help="shapes: a combination held out of training "
                                                           "(repeatable): scores held-out vs seen ones"),
          out: Path = typer.Option(Path("outputs/eval"), help="folder for eval.json and contact_sheet.png")):
    """Score a model: FID/KID vs held-out images, prompt alignment; writes JSON + contact sheet."""
    from ernielab.image.evaluate import evaluate
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.worlds.registry import DataConfig, check_data

    if n_fid < 0 or n_align < 0 or n_paraphrase < 0:
        raise UserError(f"--n-fid, --n-align and --n-paraphrase must be >= 0, got {n_fid}, {n_align} and {n_paraphrase}")
    if (n_paraphrase or holdout) and data != "shapes":
        raise UserError("--n-paraphrase and --holdout need --data shapes (they are shapes-world evaluations)")
    if n_fid == 0 and n_align == 0:
        raise UserError("nothing to evaluate: --n-fid and --n-align are both 0")
    check_output_dir(out, "--out")
    pipe = TextToImagePipeline.from_pretrained(model)
    cfg = DataConfig(kind=data, path=data_path, image_size=image_size or pipe.config.height,
                     holdout_combinations=list(holdout or []))
    check_data(cfg)
    size = cfg.image_size
    pipe.check_arguments("x", height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, shift=shift)
    report = evaluate(pipe, cfg, n_fid=n_fid, n_align=n_align, seed=seed, steps=steps, guidance_scale=guidance,
                      shift=shift, out_dir=out, n_paraphrase=n_paraphrase)
    summary = {"fid_kid": report.get("fid_kid"),
               "alignment": {k: v.get("overall", v) for k, v in report.get("alignment", {}).items()}}
    if "paraphrase" in report:  # all-correct per kind, template vs its paraphrase twin
        summary["paraphrase"] = {kind: {w: v[w]["all"] for w in ("template", "paraphrase") if w in v}
                                 for kind, v in report["paraphrase"].items()}
    if "compositional" in report:
        summary["compositional"] = {g: v["all"] for g, v in report["compositional"].items() if isinstance(v, dict)}
    typer.echo(json.dumps(summary, indent=2, default=float))
    typer.echo(f"report: {out / 'eval.json'}")


@app.command()
@user_errors
def export(run_dir: Path = typer.Argument(..., help="training output_dir"),
           out: Path = typer.Option(..., "--out", help="pipeline folder to write"),
           checkpoint: Optional[Path] = typer.Option(None, help="checkpoint folder (default: latest)"),
           raw: bool = typer.Option(False, help="export the raw weights instead of the EMA"),
           half: bool = typer.Option(False, help="store weights as float16 (half the size)")):
    """Export a training checkpoint as a pipeline folder usable by generate/eval."""
    import torch

    from ernielab.image.train import export_checkpoint

    check_output_dir(out, "--out")
    path = export_checkpoint(run_dir, out, checkpoint, use_ema=not raw, dtype=torch.float16 if half else None)
    typer.echo(str(path))


@app.command()
@user_errors
def info(model: Optional[Path] = typer.Argument(None, help="pipeline folder (default: the bundled model)")):
    """Print a saved pipeline's configuration and parameter count."""
    from ernielab.image.pipeline import DEFAULT_MODEL, describe

    typer.echo(json.dumps(describe(model or DEFAULT_MODEL), indent=2))


