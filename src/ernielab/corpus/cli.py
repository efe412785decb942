"""`ernielab data ...`: scan, dedupe, categorize, caption, score, diversify, export and sample an image corpus
(see docs/corpus.md).

Each step rewrites the manifest in place (or writes --out), skips rows it has done, and resumes after an
interruption; every bad input is one `error: ...` line with exit code 2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ernielab.core.cli import check_output_dir, set_threads, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Corpus toolchain: scan, dedupe, categorize, caption, score, diversify, export, sample "
                       "(manifest in Parquet/JSONL).")

MANIFEST = typer.Argument(..., help="manifest written by `ernielab data scan` (.parquet or .jsonl)")
OUT = typer.Option(None, "--out", help="write the result here instead of updating MANIFEST in place")
SAVE_EVERY = typer.Option(1000, "--save-every", help="save the manifest every N rows (resume point)")


def _check_out(path: Optional[Path]) -> None:
    from ernielab.corpus.manifest import check_manifest_path

    if path is not None:
        check_manifest_path(path, "--out")
        check_output_dir(path.parent, "folder of --out")


def _echo(result: dict) -> None:
    typer.echo(json.dumps(result, default=float))


@app.command("scan")
@user_errors
def scan_(src: str = typer.Argument(..., help="image folder (captions from same-stem .txt), .jsonl of {image, "
                                           "caption}, or shapes:N / mnist:N (a world written as PNG files)"),
          out: Path = typer.Option(..., "--out", help="manifest to write (.parquet or .jsonl)"),
          images: Optional[Path] = typer.Option(None, "--images", help="for shapes:N / mnist:N: where the PNGs go "
                                                "(default: <manifest stem>_images next to the manifest)"),
          seed: int = typer.Option(0, help="world seed (shapes scenes, mnist caption templates)"),
          save_every: int = SAVE_EVERY):
    """One row per image: id, path, sha256, width, height, caption (if any), meta (world ground truth)."""
    from ernielab.corpus.steps import parse_world, scan

    _check_out(out)
    if parse_world(src) is not None and images is None:
        images = out.with_name(f"{out.stem}_images")
    if images is not None:
        check_output_dir(images, "--images")
    rows = scan(src, out, images, seed, save_every)
    _echo({"manifest": str(out), "rows": len(rows), "captioned": sum(r.get("caption") is not None for r in rows)})


@app.command("dedupe")
@user_errors
def dedupe_(manifest: Path = MANIFEST, threshold: int = typer.Option(12, help="max pHash Hamming distance (bits of "
                                                                              "256) for a near duplicate"),
            colour_tolerance: float = typer.Option(48.0, "--colour-tolerance", help="max opponent-colour "
                                                   "difference of any 8x8 thumbnail cell (0-510)"),
            out: Optional[Path] = OUT, save_every: int = SAVE_EVERY):
    """256-bit pHash and a colour signature per image; duplicate_of = the first earlier image with the same
    bytes, or a pHash within --threshold bits and colours within --colour-tolerance."""
    from ernielab.corpus.steps import dedupe

    _check_out(out)
    _echo(dedupe(manifest, threshold, out, save_every, colour_tolerance=colour_tolerance))


@app.command("categorize")
@user_errors
def categorize_(manifest: Path = MANIFEST,
                classifier: str = typer.Option("shapes", help="shapes (world ground truth or caption), digits "
                                               "(label or the shipped digit CNN), or module:callable taking "
                                               "(images, rows) and returning one category string per image"),
                redo: bool = typer.Option(False, "--redo", help="recompute rows that already have a category"),
                batch_size: int = typer.Option(256), out: Optional[Path] = OUT, save_every: int = SAVE_EVERY,
                threads: int = typer.Option(0, help="torch CPU threads (0 = default)")):
    """category per image, from a pluggable classifier."""
    from ernielab.corpus.steps import categorize

    _check_out(out)
    set_threads(threads)
    _echo(categorize(manifest, classifier, out, redo, batch_size, save_every))


@app.command("caption")
@user_errors
def caption_(manifest: Path = MANIFEST,
             captioner: str = typer.Option("shapes", help="shapes (ground truth), digits, or module:callable taking "
                                           "(images, rows, level) and returning one caption per image"),
             levels: str = typer.Option("short,medium,detailed", help="comma-separated levels; column caption_<level>"),
             redo: bool = typer.Option(False, "--redo"), batch_size: int = typer.Option(256),
             out: Optional[Path] = OUT, save_every: int = SAVE_EVERY):
    """Captions at several levels of detail, one column per level."""
    from ernielab.corpus.steps import caption

    _check_out(out)
    _echo(caption(manifest, captioner, levels, out, redo, batch_size, save_every))


@app.command("score")
@user_errors
def score_(manifest: Path = MANIFEST,
           model: Optional[Path] = typer.Option(None, help="aesthetic scorer folder (default: the shipped one)"),
           redo: bool = typer.Option(False, "--redo"), batch_size: int = typer.Option(64),
           out: Optional[Path] = OUT, save_every: int = SAVE_EVERY,
           threads: int = typer.Option(0, help="torch CPU threads (0 = default)")):
    """aesthetic = the project's aesthetic scorer (ernielab.aesthetic.scorer) on each image."""
    from ernielab.corpus.steps import score

    _check_out(out)
    set_threads(threads)
    _echo(score(manifest, model, out, redo, batch_size, save_every))


@app.command("sample")
@user_errors
def sample_(manifest: Path = MANIFEST,
            out: Path = typer.Option(..., "--out", help="JSON file: indices (manifest ids) plus weights and shares"),
            n: int = typer.Option(..., "-n", help="how many indices to draw (with replacement)"),
            seed: int = typer.Option(0), alpha: float = typer.Option(0.5, help="category size exponent (< 1 lifts "
                                                                               "the long tail)"),
            beta: float = typer.Option(1.0, help="weight of a category's mean (standardised) aesthetic score"),
            temperature: float = typer.Option(1.0, help="within a category: p ∝ exp(z / temperature)"),
            no_scores: bool = typer.Option(False, "--no-scores", help="ignore aesthetic scores")):
    """The report's two-level sampler: category by size^alpha and aesthetics, then image by aesthetic score;
    duplicates are never drawn."""
    from ernielab.corpus.steps import sample

    check_output_dir(out.parent, "folder of --out")
    report = sample(manifest, out, n, seed, alpha, beta, temperature, not no_scores)
    _echo({k: report[k] for k in ("n", "seed", "excluded_duplicates", "category_weights", "category_share")}
          | {"out": str(out)})


@app.command("diversify")
@user_errors
def diversify_(manifest: Path = MANIFEST,
               styles: Optional[str] = typer.Option(None, help="comma-separated styles; lm: short, paraphrase, "
                                                    "detailed, keywords, digits (the default), words, relation; "
                                                    "grammar: template, paraphrase, detailed, keywords, digits "
                                                    "(worlds.phrasing.STYLES, all by default)"),
               per_image: int = typer.Option(3, "--per-image", help="rewrites per image (styles cycled in a "
                                             "per-image shuffled order)"),
               rewriter: str = typer.Option("lm", help="lm (any transformers causal LM) or grammar (shapes world)"),
               lm: Optional[str] = typer.Option(None, "--lm", help="causal-LM folder or hub id (cached when "
                                                "HF_HUB_OFFLINE is set); default: the bundled shapes enhancer"),
               seed: int = typer.Option(0, help="rewrite k of row i is seeded by (seed, i, k)"),
               check: Optional[str] = typer.Option(None, "--check", help="shapes (worlds.prompt_facts "
                                                   "contradictions) or module:callable(caption, rewrite) -> list "
                                                   "of problems; flagged rewrites go to prompts_rejected"),
               retries: int = typer.Option(0, help="redraw a rewrite --check flags up to this many times "
                                           "(new seed each time; every flagged draw is recorded)"),
               source: str = typer.Option("auto", help="caption column to rewrite; auto = first non-empty of "
                                          "caption_medium, caption, caption_detailed, caption_short"),
               temperature: float = typer.Option(0.7, help="lm sampling temperature (0 = greedy)"),
               top_p: float = typer.Option(0.95, "--top-p"),
               max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
               device: str = typer.Option("cpu", help="lm device (cpu, cuda, ...)"),
               redo: bool = typer.Option(False, "--redo", help="replace existing rewrites (also needed to change "
                                         "settings)"),
               batch_size: int = typer.Option(16, help="images per batch (lm: x per-image prompts per generate)"),
               out: Optional[Path] = OUT, save_every: int = SAVE_EVERY,
               threads: int = typer.Option(0, help="torch CPU threads (0 = default)")):
    """prompts = per image N rewrites of its caption in user styles (short intent, paraphrase, detailed,
    keywords, numbers as digits...), as in the ERNIE-Image report's prompt diversification."""
    from ernielab.corpus.diversify import diversify

    _check_out(out)
    set_threads(threads)
    _echo(diversify(manifest, styles, per_image, rewriter, lm, seed, out, redo, check, source, batch_size,
                    save_every, device, temperature, top_p, max_new_tokens, retries))


@app.command("export")
@user_errors
def export_(manifest: Path = MANIFEST,
            out: Path = typer.Option(..., "--out", help="JSONL of {image, caption} for data.kind=folder"),
            captions: str = typer.Option("all", help="comma-separated caption columns and/or 'prompts' (the "
                                         "diversified rewrites); all = every caption* column and prompts"),
            one_per_image: bool = typer.Option(False, "--one-per-image", help="one text per image, drawn by "
                                               "--seed (default: one line per image and text)"),
            seed: int = typer.Option(0),
            keep_duplicates: bool = typer.Option(False, "--keep-duplicates", help="also export rows that dedupe "
                                                 "marked as duplicates")):
    """Training pairs from a manifest: a JSONL that `data.kind=folder data.path=OUT` (ImageCaptionFolder) reads."""
    from ernielab.corpus.steps import export

    check_output_dir(out.parent, "folder of --out")
    _echo(export(manifest, out, captions, one_per_image, seed, keep_duplicates))
