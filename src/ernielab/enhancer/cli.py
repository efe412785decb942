"""`ernielab enhancer ...`: `enhance` rewrites short prompts with a prompt-enhancer LM (default: the bundled
shapes-world one; also mounted as the top-level `ernielab enhance`), `train CONFIG.json` trains one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, add_train_command, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prompt enhancer: rewrite short prompts with a causal LM (enhance), train one (train).")


@user_errors
def enhance(prompt: Optional[str] = typer.Argument(None, help="the prompt (or use --prompts FILE)"),
            prompts: Optional[Path] = typer.Option(None, "--prompts", help="text file, one prompt per line"),
            model: Optional[Path] = typer.Option(None, "--model", help="causal-LM folder (default: bundled enhancer)"),
            seed: int = typer.Option(0, help="prompt i uses seed + i"),
            temperature: Optional[float] = typer.Option(None, help="default: the enhancer's (0.6); 0 = greedy"),
            top_p: Optional[float] = typer.Option(None, "--top-p", help="default: the enhancer's (0.95)"),
            width: int = typer.Option(32, help="image width put in the request"),
            height: int = typer.Option(32, help="image height put in the request"),
            as_json: bool = typer.Option(False, "--json", help="print JSON lines {prompt, revised}")):
    """Print one revised prompt per input prompt."""
    from ernielab.core.cli import read_prompts
    from ernielab.enhancer.model import PromptEnhancer

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of PROMPT or --prompts FILE")
    texts = read_prompts(prompts) if prompts is not None else [prompt]
    if any(not t.strip() for t in texts):
        raise UserError("empty prompt (blank line in the prompt file?)")
    if width <= 0 or height <= 0:
        raise UserError(f"--width and --height must be positive, got {width}x{height}")
    enhancer = PromptEnhancer.from_pretrained(model)
    revised = enhancer.enhance_many(texts, width=width, height=height, seed=seed, temperature=temperature,
                                    top_p=top_p, progress=len(texts) > 1)
    for text, new in zip(texts, revised):
        typer.echo(json.dumps({"prompt": text, "revised": new}) if as_json else new)


app.command("enhance")(enhance)


def run_training(cfg) -> dict:
    """`ernielab enhancer train CONFIG.json`: the shapes-world enhancer through the engine."""
    from ernielab.enhancer.train import train_enhancer

    return train_enhancer(cfg)


add_train_command(app, "ernielab.enhancer.train:EnhancerTrainConfig", run_training,
                  "a prompt enhancer (a tiny GPT-2 on shapes-world intent -> caption pairs)")
