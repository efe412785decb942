"""`ernielab dpo ...`: make preference pairs with a judge, then align a model with stabilized Diffusion-DPO."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, add_train_command, check_output_dir, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Diffusion-DPO preference alignment: make-pairs, train.")

PROMPT_KINDS = ("single", "count", "relation")


def pair_prompts(prompts_file: Optional[Path], kinds: str, n: int, prompt_seed: int) -> list[str]:
    """Prompts from a file (one a line), or n shapes-world prompts per kind."""
    if prompts_file is not None:
        from ernielab.core.cli import read_prompts

        return [p for p in read_prompts(prompts_file) if p]
    from ernielab.worlds.shapes import make_prompts

    names = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in names if k not in PROMPT_KINDS]
    if unknown or not names:
        raise UserError(f"--kinds must be a comma list of {', '.join(PROMPT_KINDS)}, got {kinds!r}")
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    return [p for k in names for p in make_prompts(k, n, seed=prompt_seed)]


@app.command("make-pairs")
@user_errors
def make_pairs_cmd(out: Path = typer.Option(..., "--out", help="folder for images/ and pairs.jsonl"),
                   model: Optional[Path] = typer.Option(None, help="pipeline folder (default: the bundled model)"),
                   prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one a line"),
                   kinds: str = typer.Option("relation,count", help="shapes-world prompt kinds (without --prompts)"),
                   n: int = typer.Option(150, help="prompts per kind (without --prompts)"),
                   prompt_seed: int = typer.Option(1, help="seed of the shapes-world prompt draw"),
                   candidates: int = typer.Option(4, "-k", "--candidates", help="images per prompt"),
                   seed: int = typer.Option(0, help="candidate c of prompt i uses noise seed seed + i*K + c"),
                   judge: str = typer.Option("alignment",
                                             help="'alignment', 'aesthetic[:FOLDER]' or 'package.module:callable'"),
                   steps: Optional[int] = typer.Option(None, help="sampling steps (default: the model's)"),
                   guidance: Optional[float] = typer.Option(None),
                   shift: Optional[float] = typer.Option(None),
                   threads: int = typer.Option(0, help="torch threads (0: torch's default)")):
    """Generate K candidates per prompt, judge them, keep best (chosen) vs worst (rejected)."""
    from ernielab.dpo.preferences import load_judge, make_pairs
    from ernielab.image.pipeline import TextToImagePipeline

    set_threads(threads)
    texts = pair_prompts(prompts, kinds, n, prompt_seed)
    judge_fn = load_judge(judge)
    check_output_dir(out, "--out")
    pipe = TextToImagePipeline.from_pretrained(model)
    pipe.check_arguments(texts, num_inference_steps=steps, guidance_scale=guidance, shift=shift, seed=seed)
    summary = make_pairs(pipe, texts, out, judge_fn, candidates=candidates, seed=seed,
                         num_inference_steps=steps, guidance_scale=guidance, shift=shift)
    typer.echo(json.dumps(summary, indent=2))


def run(cfg) -> dict:
    from ernielab.dpo.train import DPOTrainer

    return DPOTrainer(cfg).train()


add_train_command(app, "ernielab.dpo.train:DPOTrainConfig", run,
                  "a model on preference pairs with stabilized Diffusion-DPO (init_from: the model to align, also "
                  "the frozen reference; dpo.pairs: the pairs file)")
