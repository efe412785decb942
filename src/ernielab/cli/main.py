"""`ernielab`: the top layer. It mounts each family's commands (<family>/cli.py) and holds `generate`, which
joins the image pipeline with the prompt enhancer."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from ernielab.core.cli import (UserError, check_output_dir, check_output_file, parse_size, read_prompts,
                               user_errors)


class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, a number that is not a number) follow the error contract too: one line
    `error: ...` and exit code 2, instead of a usage box."""

    def main(self, *args, **kwargs):
        from typer._click import exceptions  # typer's own copy of click's exceptions

        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message())
            sys.exit(0)
        except exceptions.UsageError as e:
            where = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(2)
        except exceptions.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, EOFError):
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ernielab: train, generate with and evaluate ERNIE-family models.")


@app.command()
@user_errors
def generate(prompt: Optional[str] = typer.Argument(None, help="the prompt (or use --prompts FILE)"),
             output: Path = typer.Option(Path("out.png"), "-o", "--output", help="PNG path for a single prompt"),
             prompts: Optional[Path] = typer.Option(None, "--prompts", help="text file, one prompt per line"),
             out: Path = typer.Option(Path("outputs"), "--out", help="folder for --prompts results"),
             model: Optional[str] = typer.Option(None, help="ernielab pipeline folder, diffusers ErnieImagePipeline "
                                                           "folder or hub id (default: the bundled model)"),
             seed: int = typer.Option(0, help="image i uses seed + i"),
             steps: Optional[int] = typer.Option(None, help="sampling steps (default: the model's, 50)"),
             guidance: Optional[float] = typer.Option(None, help="CFG scale (default: the model's, 4.0)"),
             shift: Optional[float] = typer.Option(None, help="timestep shift (default: the model's)"),
             size: Optional[str] = typer.Option(None, help="HxW in pixels (default: the model's)"),
             negative: Optional[str] = typer.Option(None, help="negative prompt"),
             batch_size: int = typer.Option(16),
             enhance: bool = typer.Option(False, "--enhance", help="rewrite prompts with a prompt enhancer first: "
                                          "the release's own (pe/) if the model has one, else the bundled one"),
             enhancer: Optional[Path] = typer.Option(None, "--enhancer",
                                                     help="enhancer folder (implies --enhance)"),
             enhance_check: bool = typer.Option(True, "--enhance-check/--no-enhance-check",
                                                help="draw from the prompt itself where the enhancer's rewrite "
                                                "contradicts it (the enhancer's own check: shapes-world facts for "
                                                "the bundled one, none for a release's pe/)"),
             image: Optional[Path] = typer.Option(None, "--image", help="start from this picture (image-to-image; "
                                                  "the output has its size unless --size is given)"),
             strength: Optional[float] = typer.Option(None, "--strength", help="with --image: how much to change "
                                                      "it, in (0, 1]; 1 = ignore it (default 0.6)"),
             mask: Optional[Path] = typer.Option(None, "--mask", help="with --image: inpainting mask, white = "
                                                 "repaint, black = keep (the image's size)"),
             n_per_prompt: int = typer.Option(1, "--n-per-prompt", help="images per prompt; image i of prompt p "
                                              "uses seed + p * N + i"),
             loras: Optional[list[str]] = typer.Option(None, "--lora", metavar="FILE[:SCALE]",
                                                       help="apply a LoRA file (diffusers, peft, ComfyUI, kohya...) "
                                                       "at weight SCALE (default 1.0); repeat for several"),
             quantize_mode: Optional[str] = typer.Option(None, "--quantize", metavar="int8|fp8",
                                                         help="quantize the transformer's weights with torchao "
                                                         "(fp8: GPUs of compute capability >= 8.9 only, or where "
                                                         "torchao runs it)")):
    """Generate images. One prompt -> one PNG (with --n-per-prompt N: OUTPUT_0.png ... OUTPUT_{N-1}.png);
    --prompts FILE -> DIR/0000.png ... (prompt-major) and DIR/grid.png."""
    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.image.pipeline import TextToImagePipeline

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of PROMPT or --prompts FILE")
    texts = read_prompts(prompts) if prompts is not None else [prompt]
    if any(not t.strip() for t in texts):
        raise UserError("empty prompt (blank line in the prompt file?)")
    check_output_file(output) if prompts is None else check_output_dir(out, "--out")
    height, width = parse_size(size)
    if image is None and (strength is not None or mask is not None):
        raise UserError("--strength and --mask need --image")
    if strength is not None and not 0 < strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    if n_per_prompt < 1:
        raise UserError(f"--n-per-prompt must be >= 1, got {n_per_prompt}")
    lora_specs = [_parse_lora(spec) for spec in loras or []]
    if quantize_mode is not None and quantize_mode not in ("int8", "fp8"):
        raise UserError(f"--quantize must be int8 or fp8, got {quantize_mode!r}")
    init_image = _read_image(image, "--image", "RGB") if image is not None else None
    mask_image = _read_image(mask, "--mask", "L") if mask is not None else None
    pipe = TextToImagePipeline.from_pretrained(model)
    _apply_loras(pipe, lora_specs, fuse=quantize_mode is not None)
    if quantize_mode is not None:
        from ernielab.image.quant import quantize

        quantize(pipe, quantize_mode)
    prompt_enhancer = None
    if enhancer is not None:
        prompt_enhancer = PromptEnhancer.from_pretrained(enhancer)
    elif enhance:
        prompt_enhancer = pipe.prompt_enhancer or PromptEnhancer.from_pretrained()
    extra = {}
    if init_image is not None:
        extra = dict(image=init_image, strength=strength, mask_image=mask_image)
    if n_per_prompt != 1:
        extra["num_images_per_prompt"] = n_per_prompt
    pipe.check_arguments(texts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                         shift=shift, seed=seed, batch_size=batch_size, negative_prompt=negative, **extra)
    result = pipe(texts, seed=seed, num_inference_steps=steps, guidance_scale=guidance, shift=shift, height=height,
                  width=width, negative_prompt=negative, batch_size=batch_size, progress=True,
                  enhancer=prompt_enhancer, enhancer_check="auto" if enhance_check else None, **extra)
    images, revised = result.images, result.revised_prompts
    fallbacks = result.enhancer_fallbacks[::n_per_prompt]  # one per prompt
    for i, fallback in enumerate(fallbacks):
        if fallback is not None:
            typer.echo(f"enhancer fallback: prompt {i} {texts[i]!r}: rewrite {fallback.rewrite!r} contradicts it "
                       f"({'; '.join(fallback.reasons)}); drawing from the prompt")
    if prompts is None:
        output.parent.mkdir(parents=True, exist_ok=True)
        paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}")
                                                    for i in range(len(images))]
        for img, path in zip(images, paths):
            img.save(path)
        if prompt_enhancer is not None:
            typer.echo(f"revised prompt: {revised[0]}")
        for path in paths:
            typer.echo(str(path))
        return
    from ernielab.core.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("[0-9][0-9][0-9][0-9]*.png"), out / "grid.png", out / "prompts.txt"]:
        stale.unlink(missing_ok=True)  # an earlier run's images never sit beside this run's prompts.json
    width_digits = max(4, len(str(len(images) - 1)))
    for i, img in enumerate(images):
        img.save(out / f"{i:0{width_digits}d}.png")
    save_grid([__import__("numpy").asarray(im) for im in images], out / "grid.png", captions=revised)
    record = {"seed": seed, "prompts": texts}
    if n_per_prompt != 1:
        record["n_per_prompt"] = n_per_prompt
    if prompt_enhancer is not None:  # the prompts the images were drawn from
        record["revised_prompts"] = revised
        record["enhancer_fallbacks"] = [None if f is None else {"rewrite": f.rewrite, "reasons": f.reasons}
                                        for f in fallbacks]
        (out / "prompts.txt").write_text("".join(r + "\n" for r in revised))
    (out / "prompts.json").write_text(json.dumps(record, indent=2))
    typer.echo(f"{len(images)} images in {out}")


def _parse_lora(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (an existing file or folder, scale). A trailing `:number` is the scale."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a ':' inside the path itself
    if not Path(path).exists():
        raise UserError(f"--lora {spec}: no LoRA file at {path}")
    return Path(path), scale


def _apply_loras(pipe, specs: list[tuple[Path, float]], fuse: bool = False) -> None:
    """Load each LoRA (a file for another model or with unknown keys is a ValueError: one error line, before
    sampling) and make them all active with their scales; `fuse` adds them into the weights and drops the adapter
    layers (needed before quantizing)."""
    if not specs:
        return
    from safetensors import SafetensorError

    from ernielab.image import lora

    names = []
    for i, (path, scale) in enumerate(specs):
        try:
            names.append(lora.load_lora(pipe, path, adapter_name=f"lora_{i}", scale=scale))
        except (ValueError, OSError, SafetensorError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"--lora: {message}" if str(path) in message else f"--lora {path}: {message}") from None
    lora.set_adapters(pipe, names, [scale for _, scale in specs])
    if fuse:
        lora.unload_lora(pipe, fuse=True)


def _read_image(path: Path, option: str, mode: str):
    """A picture given on the command line, as a PIL image in `mode`; a missing or unreadable file is a UserError."""
    from PIL import Image

    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except Exception as e:  # PIL raises several kinds for a file that is not a picture
        raise UserError(f"{option} {path}: cannot read the image ({' '.join(str(e).split()) or type(e).__name__})") \
            from None


def _mount_families() -> None:
    """Each family keeps its commands in <family>/cli.py; this top layer only mounts them."""
    import importlib

    families = [("image", "ERNIE-Image: train, evaluate and export text-to-image transformers"),
                ("vilg", "ERNIE-ViLG 2.0: mixture of denoising experts, knowledge-enhanced training"),
                ("turbo", "ERNIE-Image Turbo: few-step students by distribution matching (DMD, MT-DMD)"),
                ("dpo", "Diffusion-DPO preference alignment: make-pairs, train"),
                ("aesthetic", "ERNIE-Image-Aes-style aesthetic scorer: benchmark, train, eval"),
                ("enhancer", "Prompt Enhancer: train, enhance"),
                ("sparse", "ERNIE-Sparse: hierarchical sparse transformer on LRA tasks"),
                ("unified", "ERNIE 5.0-style unified autoregressive MoE")]
    for name, help_text in families:
        app.add_typer(importlib.import_module(f"ernielab.{name}.cli").app, name=name, help=help_text)
    from ernielab.enhancer.cli import enhance
    from ernielab.image.cli import info

    app.command("info")(info)
    app.command("enhance")(enhance)
    from ernielab.serve.cli import serve

    app.command("serve")(serve)
    from ernielab.corpus.cli import app as data_app

    app.add_typer(data_app, name="data", help="Corpus toolchain: scan, dedupe, categorize, caption, score, sample")


_mount_families()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
