"""`ernielab enhancer ...`: `enhance` rewrites short prompts with a prompt-enhancer LM (default: the bundled
shapes-world one; also mounted as the top-level `ernielab enhance`), `eval` scores how faithful its rewrites are,
`train CONFIG.json` trains one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import UserError, add_train_command, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prompt enhancer: rewrite short prompts with a causal LM (enhance), score one (eval), "
                       "train one (train).")


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


@app.command("eval")
@user_errors
def eval_(model: Optional[Path] = typer.Option(None, "--model", help="enhancer folder (default: bundled enhancer)"),
          n_intents: int = typer.Option(200, "--n-intents", help="held-out intents (val split)"),
          n_paraphrase: int = typer.Option(100, "--n-paraphrase", help="unseen-wording prompts per kind"),
          seed: int = typer.Option(0, help="prompt i uses seed + i"),
          out: Optional[Path] = typer.Option(None, "--out", help="also write the scores to this JSON file")):
    """Consistency of the rewrites: on held-out intents, and on prompts worded in ways no training pair used
    (`worlds.phrasing`'s eval phrasebook), as the fraction of rewrites that keep every stated fact."""
    from ernielab.core.cli import check_output_file
    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.enhancer.train import consistency, paraphrase_consistency

    if n_intents < 0 or n_paraphrase < 0 or n_intents + n_paraphrase == 0:
        raise UserError(f"need --n-intents, --n-paraphrase >= 0, not both 0; got {n_intents} and {n_paraphrase}")
    if out is not None:
        check_output_file(out, (".json",))
    enhancer = PromptEnhancer.from_pretrained(model)
    scores = {"model": str(model) if model else "bundled", "seed": seed}
    if n_intents:
        scores |= consistency(enhancer, n_intents, seed)
    if n_paraphrase:
        scores |= paraphrase_consistency(enhancer, n_paraphrase, seed)
    text = json.dumps(scores, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


def run_training(cfg) -> dict:
    """`ernielab enhancer train CONFIG.json`: the shapes-world enhancer through the engine."""
    from ernielab.enhancer.train import train_enhancer

    return train_enhancer(cfg)


add_train_command(app, "ernielab.enhancer.train:EnhancerTrainConfig", run_training,
                  "a prompt enhancer (a tiny GPT-2 on shapes-world intent -> caption pairs)")
