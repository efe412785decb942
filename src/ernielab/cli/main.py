"""`ernielab` command line: train, generate, eval, info (+ family sub-commands)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, load_config, parse_size, read_prompts, run_options, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ernielab: train, generate with and evaluate ERNIE-family models.")


def load_train_config(path: Path, overrides: list[str]):
    from ernielab.image.train import TrainConfig

    return load_config(TrainConfig, path, overrides)


@app.command()
@user_errors
def train(config: Path = typer.Argument(..., help="training config JSON (see configs/)"),
          set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set steps=100"),
          output_dir: Optional[str] = typer.Option(None, help="override output_dir"),
          fresh: bool = typer.Option(False, help="ignore existing checkpoints (do not resume)")):
    """Train a text-to-image transformer with flow matching (resumes from the latest checkpoint)."""
    from ernielab.image.train import Trainer

    cfg = load_train_config(config, set_)
    cfg = run_options(cfg, output_dir, fresh)
    result = Trainer(cfg).train()
    typer.echo(f"trained to step {result['step']} in {result['elapsed_s']:.0f}s; pipeline at {cfg.output_dir}/pipeline")


@app.command()
@user_errors
def generate(prompt: Optional[str] = typer.Argument(None, help="the prompt (or use --prompts FILE)"),
             output: Path = typer.Option(Path("out.png"), "-o", "--output", help="PNG path for a single prompt"),
             prompts: Optional[Path] = typer.Option(None, "--prompts", help="text file, one prompt per line"),
             out: Path = typer.Option(Path("outputs"), "--out", help="folder for --prompts results"),
             model: Optional[Path] = typer.Option(None, help="pipeline folder (default: the bundled model)"),
             seed: int = typer.Option(0, help="image i uses seed + i"),
             steps: Optional[int] = typer.Option(None, help="sampling steps (default: the model's, 50)"),
             guidance: Optional[float] = typer.Option(None, help="CFG scale (default: the model's, 4.0)"),
             shift: Optional[float] = typer.Option(None, help="timestep shift (default: the model's)"),
             size: Optional[str] = typer.Option(None, help="HxW in pixels (default: the model's)"),
             negative: Optional[str] = typer.Option(None, help="negative prompt"),
             batch_size: int = typer.Option(16),
             enhance: bool = typer.Option(False, "--enhance", help="rewrite prompts with a prompt enhancer first"),
             enhancer: Optional[Path] = typer.Option(None, "--enhancer",
                                                     help="enhancer folder (default: bundled; implies --enhance)")):
    """Generate images. One prompt -> one PNG; --prompts FILE -> DIR/0000.png ... and DIR/grid.png."""
    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.image.pipeline import TextToImagePipeline

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of PROMPT or --prompts FILE")
    texts = read_prompts(prompts) if prompts is not None else [prompt]
    if any(not t for t in texts):
        raise UserError("empty prompt (blank line in the prompt file?)")
    height, width = parse_size(size)
    prompt_enhancer = PromptEnhancer.from_pretrained(enhancer) if enhance or enhancer else None
    pipe = TextToImagePipeline.from_pretrained(model)
    result = pipe(texts, seed=seed, num_inference_steps=steps, guidance_scale=guidance, shift=shift, height=height,
                  width=width, negative_prompt=negative, batch_size=batch_size, progress=True,
                  enhancer=prompt_enhancer)
    images, revised = result.images, result.revised_prompts
    if prompts is None:
        output.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(output)
        if prompt_enhancer is not None:
            typer.echo(f"revised prompt: {revised[0]}")
        typer.echo(str(output))
        return
    from ernielab.core.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    width_digits = max(4, len(str(len(images) - 1)))
    for i, img in enumerate(images):
        img.save(out / f"{i:0{width_digits}d}.png")
    save_grid([__import__("numpy").asarray(im) for im in images], out / "grid.png", captions=revised)
    record = {"seed": seed, "prompts": texts}
    if prompt_enhancer is not None:  # the prompts the images were drawn from
        record["revised_prompts"] = revised
        (out / "prompts.txt").write_text("".join(r + "\n" for r in revised))
    (out / "prompts.json").write_text(json.dumps(record, indent=2))
    typer.echo(f"{len(images)} images in {out}")


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
          out: Path = typer.Option(Path("outputs/eval"), help="folder for eval.json and contact_sheet.png")):
    """Score a model: FID/KID vs held-out images, prompt alignment; writes JSON + contact sheet."""
    from ernielab.image.evaluate import evaluate
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.worlds.registry import DataConfig

    pipe = TextToImagePipeline.from_pretrained(model)
    cfg = DataConfig(kind=data, path=data_path, image_size=image_size or pipe.config.height)
    report = evaluate(pipe, cfg, n_fid=n_fid, n_align=n_align, seed=seed, steps=steps, guidance_scale=guidance,
                      shift=shift, out_dir=out)
    summary = {"fid_kid": report.get("fid_kid"),
               "alignment": {k: v.get("overall", v) for k, v in report.get("alignment", {}).items()}}
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

    path = export_checkpoint(run_dir, out, checkpoint, use_ema=not raw, dtype=torch.float16 if half else None)
    typer.echo(str(path))


@app.command()
@user_errors
def info(model: Optional[Path] = typer.Argument(None, help="pipeline folder (default: the bundled model)")):
    """Print a saved pipeline's configuration and parameter count."""
    from ernielab.image.pipeline import DEFAULT_MODEL, describe

    typer.echo(json.dumps(describe(model or DEFAULT_MODEL), indent=2))


def _mount_families() -> None:
    """Each family keeps its commands in <family>/cli.py; this top layer only mounts them."""
    from ernielab.aesthetic import cli as aesthetic
    from ernielab.dpo import cli as dpo
    from ernielab.enhancer import cli as enhancer
    from ernielab.sparse import cli as sparse
    from ernielab.turbo import cli as turbo
    from ernielab.unified import cli as unified

    app.add_typer(sparse.app, name="sparse", help="ERNIE-Sparse: hierarchical sparse transformer on LRA tasks")
    app.add_typer(unified.app, name="unified", help="ERNIE 5.0-style unified autoregressive MoE")
    app.add_typer(dpo.app, name="dpo", help="Diffusion-DPO preference alignment: make-pairs, train")
    app.add_typer(aesthetic.app, name="aesthetic", help="ERNIE-Image-Aes-style aesthetic scorer: benchmark, train, eval")
    app.command("distill")(turbo.distill)
    app.command("enhance")(enhancer.enhance)


_mount_families()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
