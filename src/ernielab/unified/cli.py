"""`ernielab unified ...`: VQ tokenizer, elastic MoE training, generation, captioning, sub-models, eval."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import parse_sets, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ERNIE 5.0-style unified model: text + VQ image tokens, one elastic MoE trunk.")


def preset(name: str):
    from ernielab.unified.config import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


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


@app.command("train-vq")
@user_errors
def train_vq(run_dir: Path = typer.Option(..., help="output folder: checkpoints, metrics.jsonl, vq.safetensors"),
             preset_name: str = typer.Option("cpu", "--preset", help="tiny | cpu"),
             set_: list[str] = typer.Option([], "--set", help="VQ config override, e.g. --set codebook_size=128"),
             steps: int = typer.Option(1500), batch_size: int = typer.Option(32), lr: float = typer.Option(2e-3),
             train_size: int = typer.Option(10_000), eval_size: int = typer.Option(256),
             seed: int = typer.Option(0), save_every: int = typer.Option(200),
             resume: bool = typer.Option(True, help="continue from run_dir's latest checkpoint"),
             threads: int = THREADS):
    """Train the VQ image tokenizer on shapes-world images; prints reconstruction metrics."""
    from ernielab.unified.train import VQTrainConfig
    from ernielab.unified.train import train_vq as run

    set_threads(threads)
    vq_cfg = preset(preset_name)[1]().replace(**parse_sets(set_))
    cfg = VQTrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_size=train_size, eval_size=eval_size,
                        seed=seed, save_every=save_every)
    typer.echo(json.dumps(run(vq_cfg, cfg, run_dir, resume=resume)))


@app.command()
@user_errors
def train(run_dir: Path = typer.Option(..., help="output folder; the final model goes to RUN_DIR/model"),
          vq: Path = typer.Option(..., help="folder written by train-vq"),
          preset_name: str = typer.Option("cpu", "--preset", help="tiny | cpu"),
          dense: bool = typer.Option(False, help="dense baseline: one GeGLU as wide as the active experts"),
          elastic: bool = typer.Option(True, help="sample elastic sub-models (MoE only)"),
          elastic_coupled: bool = typer.Option(False, help="one draw shrinks depth, experts and k together"),
          elastic_distill: float = typer.Option(0.0, help="in-place distillation: weight of KL(full model || "
                                                "sub-model) on steps that train a smaller sub-model"),
          elastic_anchor: float = typer.Option(0.0, help="share of the shrunken steps that train the anchor cut "
                                               "(the deployment sub-model) instead of a random one"),
          anchor_cut: Optional[str] = typer.Option(None, help="the anchor cut as DEPTH,EXPERTS,TOP_K (default: "
                                                   "75% of the layers, half the experts, a quarter of k)"),
          set_: list[str] = typer.Option([], "--set", help="model config override, e.g. --set num_layers=6"),
          steps: int = typer.Option(1000), t2i_batch: int = typer.Option(16), i2t_batch: int = typer.Option(16),
          text_batch: int = typer.Option(16), lr: float = typer.Option(3e-3),
          train_size: int = typer.Option(20_000), seed: int = typer.Option(0),
          save_every: int = typer.Option(250),
          stop_after: Optional[int] = typer.Option(None, help="leave after this many steps (resume later)"),
          resume: bool = typer.Option(True, help="continue from run_dir's latest checkpoint"),
          threads: int = THREADS):
    """Train the unified model (caption->image, image->caption and text in one model)."""
    from ernielab.unified.train import UnifiedTrainConfig, train_unified

    set_threads(threads)
    model_cfg = preset(preset_name)[0]().replace(**parse_sets(set_))
    if dense:
        model_cfg = model_cfg.dense_twin()
    cfg = UnifiedTrainConfig(steps=steps, t2i_batch=t2i_batch, i2t_batch=i2t_batch, text_batch=text_batch, lr=lr,
                             train_size=train_size, seed=seed, save_every=save_every,
                             elastic=elastic and not dense, elastic_coupled=elastic_coupled,
                             elastic_distill=elastic_distill if elastic and not dense else 0.0,
                             elastic_anchor=elastic_anchor if elastic and not dense else 0.0,
                             anchor_cut=parse_cut(anchor_cut))
    typer.echo(json.dumps(train_unified(model_cfg, cfg, vq, run_dir, resume=resume, stop_after=stop_after)))


def parse_cut(text: str | None) -> tuple[int, int, int] | None:
    """"3,8,1" -> (3, 8, 1)."""
    if text is None:
        return None
    try:
        depth, experts, top_k = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected DEPTH,EXPERTS,TOP_K (three integers), got {text!r}",
                                 param_hint="--anchor-cut") from None
    return depth, experts, top_k


@app.command("generate-image")
@user_errors
def generate_image(model_dir: Path = typer.Argument(..., help="a model folder (RUN_DIR/model or extracted)"),
                   prompt: str = typer.Argument(..., help='e.g. "a red circle to the left of a blue square"'),
                   output: Path = typer.Option(Path("unified.png"), "-o", "--output"),
                   n: int = typer.Option(1, help="images for the prompt (a grid when > 1)"),
                   seed: int = typer.Option(0), guidance: float = typer.Option(3.0),
                   temperature: float = typer.Option(1.0), sample_top_k: int = typer.Option(0),
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
    typer.echo(json.dumps({"output": str(output), "decoding_steps": steps, "tokens": codes[0].numel()}))


@app.command()
@user_errors
def caption(model_dir: Path = typer.Argument(..., help="a model folder"),
            images: list[Path] = typer.Argument(..., help="PNG images of the VQ's size"),
            depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
            threads: int = THREADS):
    """Caption images (greedy); prints one JSON line per image."""
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
    ids, _ = caption_codes(model, vq.encode(torch.stack(tensors)), sub=submodel_options(model, depth, experts, top_k))
    for path, row in zip(images, ids):
        typer.echo(json.dumps({"image": str(path), "caption": tok.decode(row)}))


@app.command("extract-submodel")
@user_errors
def extract_submodel(model_dir: Path = typer.Argument(..., help="the elastic super-model folder"),
                     out: Path = typer.Argument(..., help="folder for the standalone sub-model"),
                     depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
                     select_on_val: bool = typer.Option(
                         False, help="choose the kept layers / experts by held-out loss on val items the eval never "
                                     "reads (default: evenly spaced layers, experts by training gate mass)"),
                     select_n: int = typer.Option(64, help="val items in the selection set (per task)"),
                     select_tasks: str = typer.Option("t2i,i2t,text", help="tasks whose loss is summed for selection"),
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
        sub, report = select_submodel(model, vq, depth, experts, top_k, n=select_n, tasks=tasks)
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
          n_text: int = typer.Option(500, help="held-out captions for text perplexity"),
          n_caption: int = typer.Option(200, help="held-out images to caption"),
          per_kind: int = typer.Option(30, min=0, help="generated images per prompt kind (single/count/relation); "
                                                      "0 skips image alignment"),
          seed: int = typer.Option(0), guidance: float = typer.Option(3.0),
          temperature: float = typer.Option(1.0), sample_top_k: int = typer.Option(0),
          speed: bool = typer.Option(True, help="measure decoding tokens/s"),
          depth: Optional[int] = DEPTH, experts: Optional[int] = EXPERTS, top_k: Optional[int] = TOP_K,
          out: Optional[Path] = typer.Option(None, help="also write the full report here (JSON)"),
          threads: int = THREADS):
    """Text perplexity, caption accuracy, image alignment, decoding speed and routing balance."""
    from ernielab.unified.evaluation import evaluate
    from ernielab.unified.io import load_model
    from ernielab.unified.model import parameter_counts

    set_threads(threads)
    model, vq, meta = load_model(model_dir)
    sub = submodel_options(model, depth, experts, top_k)
    report = evaluate(model, vq, sub, n_text, n_caption, per_kind, seed, guidance, temperature, sample_top_k, speed)
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
