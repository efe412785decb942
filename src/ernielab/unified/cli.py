"""`ernielab unified ...`: VQ tokenizer and elastic MoE training from configs (configs/unified/*.json),
generation, captioning, sub-models, eval.

Evaluation and sampling options take their defaults from `config.EvalSettings` (written once, checked there);
nothing here imports torch until a command runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import add_train_command, set_threads, user_errors
from ernielab.unified.config import TASKS, EvalSettings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE 5.0-style unified model: text + VQ image tokens, one elastic MoE trunk.")
EVAL = EvalSettings()


def submodel_options(model, depth: Optional[int], experts: Optional[int], top_k: Optional[int]):
    """An elastic SubModel from CLI options (None when all are unset)."""
    if depth is None and experts is None and top_k is None:
        return None
    from ernielab.unified.submodel import describe_submodel

    return describe_submodel(model, depth=depth, num_experts=experts, top_k=top_k)


DEPTH = typer.Option(None, help="run only this many layers (evenly spaced, first and last kept)")
EXPERTS = typer.Option(None, help="experts per layer to keep (the most used in training)")
TOP_K = typer.Option(None, help="experts per token")
THREADS = typer.Option(1, help="torch CPU threads (0 = torch default)")


def run_unified(cfg):
    from ernielab.unified.train import train_unified

    return train_unified(cfg, progress=True)


add_train_command(app, "ernielab.unified.train:UnifiedTrainConfig", run_unified,
                  "the unified model (caption->image, image->caption and text in one elastic MoE; RUN/model)")


def run_rl(cfg) -> dict:
    from ernielab.unified.rl import train_rl

    return train_rl(cfg)


add_train_command(app, "ernielab.unified.rl:UnifiedRLConfig", run_rl,
                  "RL post-training of a unified model on checked rewards (RUN/model)", name="rl")


def run_vq(cfg) -> dict:
    from ernielab.unified.train import train_vq

    return train_vq(cfg, progress=True)


add_train_command(app, "ernielab.unified.train:VQTrainConfig", run_vq,
                  "the VQ image tokenizer (prints its reconstruction metrics)", name="vq")


@app.command("generate-image")
@user_errors
def generate_image(model_dir: Path = typer.Argument(..., help="a model folder (RUN_DIR/model or extracted)"),
                   prompt: str = typer.Argument(..., help='e.g. "a red circle to the left of a blue square"'),
                   output: Path = typer.Option(Path("unified.png"), "-o", "--output"),
                   n: int = typer.Option(1, help="images for the prompt (a grid when > 1)"),
                   seed: int = typer.Option(EVAL.seed), guidance: float = typer.Option(EVAL.guidance),
                   temperature: float = typer.Option(EVAL.temperature),
                   sample_top_k: int = typer.Option(EVAL.top_k, help="sample among the k likeliest codes (0 = all)"),
                   depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
                   threads: int = THREADS):
    """Generate images row by row (one decoding step per row of VQ tokens)."""
    import torch

    from ernielab.core.images import save_grid
    from ernielab.core.seeding import generator
    from ernielab.unified.generate import generate_image_codes
    from ernielab.unified.io import load_model
    from ernielab.unified.tokenizer import TextTokenizer

    set_threads(threads)
    if n < 1:
        raise ValueError("--n must be >= 1")
    model, vq, _ = load_model(model_dir)
    tok = TextTokenizer(model.config.text_vocab)
    ids = tok.encode(prompt, model.config.max_text_len)
    sub = submodel_options(model, depth, experts, top_k)
    codes, steps = generate_image_codes(model, [ids] * n, sub, guidance, temperature, sample_top_k,
                                        generator("unified-generate", seed))
    with torch.no_grad():
        images = vq.decode(codes).clamp(-1, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    if n == 1:
        from PIL import Image

        array = ((images[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(output)
    else:
        save_grid(list(images), output, captions=[prompt] * n)
    typer.echo(json.dumps({"output": str(output), "decoding_steps": steps, "tokens": int((codes[0] >= 0).sum())}))


@app.command()
@user_errors
def caption(model_dir: Path = typer.Argument(..., help="a model folder"),
            images: list[Path] = typer.Argument(..., help="PNG images of the VQ's size"),
            depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
            draft_heads: int = typer.Option(0, help="self-speculative decoding: draft with this many MTP heads, "
                                                    "verify in one forward (same captions; 0 = one token per forward)"),
            threads: int = THREADS):
    """Caption images (greedy); prints one JSON line per image (then the drafts' acceptance with --draft-heads)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ernielab.unified.generate import caption_codes
    from ernielab.unified.io import load_model
    from ernielab.unified.tokenizer import TextTokenizer
    from ernielab.worlds.shapes import image_to_tensor

    set_threads(threads)
    model, vq, _ = load_model(model_dir)
    size = vq.config.image_size
    tensors = []
    for path in images:
        try:
            array = np.array(Image.open(path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        if array.shape[:2] != (size, size):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}; this model reads {size}x{size} images")
        tensors.append(image_to_tensor(array))
    tok = TextTokenizer(model.config.text_vocab)
    codes, sub = vq.encode(torch.stack(tensors)), submodel_options(model, depth, experts, top_k)
    if draft_heads:
        from ernielab.unified.speculative import speculative_caption_codes

        ids, stats = speculative_caption_codes(model, codes, sub=sub, draft_heads=draft_heads)
    else:
        ids, _ = caption_codes(model, codes, sub=sub)
    for path, row in zip(images, ids):
        typer.echo(json.dumps({"image": str(path), "caption": tok.decode(row)}))
    if draft_heads:
        typer.echo(json.dumps({"speculative": stats.to_dict()}))


@app.command("extract-submodel")
@user_errors
def extract_submodel(model_dir: Path = typer.Argument(..., help="the elastic super-model folder"),
                     out: Path = typer.Argument(..., help="folder for the standalone sub-model"),
                     depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
                     select_on_val: bool = typer.Option(
                         False, help="choose the kept layers / experts by held-out loss on val items the eval never "
                                     "reads (default: evenly spaced layers, experts by training gate mass)"),
                     select_n: Optional[int] = typer.Option(None, help="val items in the selection set (per task; "
                                                                       "default: select_submodel's)"),
                     select_tasks: str = typer.Option(",".join(TASKS), help="tasks whose loss is summed for selection"),
                     threads: int = THREADS):
    """Cut a smaller standalone model (depth, experts, top-k) out of an elastically trained one."""
    from ernielab.unified.io import load_model, save_model
    from ernielab.unified.model import parameter_counts
    from ernielab.unified.selection import select_submodel
    from ernielab.unified.submodel import describe_submodel, submodel_summary
    from ernielab.unified.submodel import extract_submodel as extract

    set_threads(threads)
    if out.resolve() == model_dir.resolve():
        raise ValueError("the output folder must differ from the model folder")
    model, vq, meta = load_model(model_dir)
    selection = None
    if select_on_val:
        tasks = tuple(t.strip() for t in select_tasks.split(",") if t.strip())
        sub, report = select_submodel(model, vq, depth, experts, top_k, tasks=tasks,
                                      **({} if select_n is None else {"n": select_n}))
        selection = {k: report[k] for k in ("selection_set", "loss")}
    else:
        sub = describe_submodel(model, depth=depth, num_experts=experts, top_k=top_k)
    small = extract(model, sub)
    info = {"source": str(model_dir), "submodel": submodel_summary(sub), "params": parameter_counts(small),
            "source_params": parameter_counts(model), "selection": selection}
    save_model(out, small, vq, {**meta, **info})
    typer.echo(json.dumps({"output": str(out), **info}))


@app.command("eval")
@user_errors
def eval_(model_dir: Path = typer.Argument(..., help="a model folder"),
          n_text: int = typer.Option(EVAL.n_text, help="held-out captions for text perplexity"),
          n_caption: int = typer.Option(EVAL.n_caption, help="held-out images to caption"),
          per_kind: int = typer.Option(EVAL.per_kind, help="generated images per prompt kind (single/count/relation); "
                                                           "0 skips image alignment"),
          seed: int = typer.Option(EVAL.seed), guidance: float = typer.Option(EVAL.guidance),
          temperature: float = typer.Option(EVAL.temperature),
          sample_top_k: int = typer.Option(EVAL.top_k, help="sample among the k likeliest codes (0 = all)"),
          speed: bool = typer.Option(EVAL.speed, help="measure decoding tokens/s"),
          depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
          out: Optional[Path] = typer.Option(None, help="also write the full report here (JSON)"),
          threads: int = THREADS):
    """Text perplexity, caption accuracy, image alignment, decoding speed and routing balance."""
    from ernielab.unified.evaluation import evaluate
    from ernielab.unified.io import load_model
    from ernielab.unified.model import parameter_counts

    settings = EvalSettings(n_text=n_text, n_caption=n_caption, per_kind=per_kind, seed=seed, guidance=guidance,
                            temperature=temperature, top_k=sample_top_k, speed=speed)
    settings.validate()  # before any model is read
    set_threads(threads)
    model, vq, meta = load_model(model_dir)
    sub = submodel_options(model, depth, experts, top_k)
    report = evaluate(model, vq, sub, **settings.to_dict())
    report["params"] = parameter_counts(model) if sub is None else None
    report["submodel"] = meta.get("submodel")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {"text_perplexity": report["text_perplexity"], "caption_accuracy": report["caption"]["accuracy"],
               "image_alignment": (report["image_alignment"] or {}).get("all"), "params": report["params"]}
    if speed:
        summary["image_tokens_per_s"] = report["speed"]["image_tokens_per_s"]
    typer.echo(json.dumps(summary))
