"""The corpus steps as plain functions. Each reads and writes a manifest (see `manifest.py`), skips rows it
has already done, saves every `save_every` rows and when interrupted, and validates its inputs before
writing anything.

Columns: scan -> id, path, sha256, width, height, caption, meta (JSON text: world ground truth or extra JSONL
keys); dedupe -> phash (256-bit hex), chroma (colour signature), duplicate_of; categorize -> category; caption -> caption_<level>;
score -> aesthetic; diversify (in `diversify.py`) -> prompts, prompts_rejected, prompts_by. `export` writes the
manifest's texts as {image, caption} JSON lines for the folder dataset.
"""
from __future__ import annotations

import importlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ernielab.corpus.hashing import (PHASH_SIZE, chroma, chroma_array, chroma_distance, file_sha256, hamming, phash,
                                    to_words)
from ernielab.corpus.manifest import check_manifest_path, read_manifest, write_manifest

LEVELS = ("short", "medium", "detailed")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(row_or_path) -> Image.Image:
    from ernielab.worlds.folder import load_rgb

    path = Path(row_or_path["path"] if isinstance(row_or_path, dict) else row_or_path)
    try:
        return load_rgb(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {' '.join(str(e).split())}") from None


def meta(row: dict) -> dict:
    return json.loads(row["meta"]) if row.get("meta") else {}


# ----------------------------------------------------------------------------- running a step


def run_step(rows: list[dict], out: Path, todo: Callable[[dict], bool], work: Callable[[list[dict]], list[dict]],
             desc: str, batch_size: int = 64, save_every: int = 1000, progress: bool = True) -> int:
    """Apply `work` (rows -> one dict of new fields per row) to the rows `todo` selects, in batches; save the
    manifest every `save_every` rows, at the end and on any interruption. Returns the number of rows done now."""
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch size and save_every must be >= 1, got {batch_size} and {save_every}")
    pending = [i for i, row in enumerate(rows) if todo(row)]
    done = since_save = 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc=desc, unit="img", disable=not progress)
    try:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            updates = work([rows[i] for i in chunk])
            if len(updates) != len(chunk):
                raise ValueError(f"{desc}: got {len(updates)} results for {len(chunk)} images")
            for i, update in zip(chunk, updates):
                rows[i].update(update)
            done += len(chunk)
            since_save += len(chunk)
            bar.update(len(chunk))
            if since_save >= save_every:
                write_manifest(rows, out)
                since_save = 0
    finally:
        bar.close()
        if since_save:  # also on an interruption: what is done stays done
            write_manifest(rows, out)
    if not Path(out).exists():  # nothing to do, but --out names a new file
        write_manifest(rows, out)
    return done


def load_callable(spec: str, what: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what} {spec!r}: expected a built-in name or 'module:callable'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn


# ----------------------------------------------------------------------------- scan


@dataclass
class Entry:
    path: Path
    caption: str | None = None
    meta: dict | None = None
    make: Callable[[Path], None] | None = None  # writes the image first (worlds)


def _world_entries(kind: str, n: int, images: Path, seed: int) -> list[Entry]:
    if kind == "shapes":
        from ernielab.worlds.shapes import ShapesWorld, render

        world = ShapesWorld(n, seed=seed)

        def entry(i: int) -> Entry:
            scene, text = world.scene(i)
            return Entry(images / f"{i:06d}.png", text, {"world": "shapes", "scene": scene.to_dict()},
                         lambda p, s=scene: Image.fromarray(render(s)).save(p))

        return [entry(i) for i in range(n)]
    from ernielab.worlds.mnist import TEMPLATES, _mnist_arrays, digit_caption

    pixels, labels = _mnist_arrays()
    if n > len(labels):
        raise ValueError(f"mnist:{n}: only {len(labels)} digits are available offline")
    templates = np.random.default_rng(seed).integers(len(TEMPLATES), size=n)

    def save(p: Path, i: int) -> None:
        Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8), "L").save(p)

    return [Entry(images / f"{i:06d}.png", digit_caption(int(labels[i]), int(templates[i])),
                  {"world": "mnist", "label": int(labels[i])}, lambda p, i=i: save(p, i)) for i in range(n)]


def _jsonl_entries(path: Path) -> list[Entry]:
    from ernielab.worlds.folder import jsonl_objects

    entries = []
    expected = "a JSON object with an 'image' path (and optionally 'caption')"
    for where, obj in jsonl_objects(path, expected):
        if not isinstance(obj.get("image"), str):
            raise ValueError(f"{where}: expected {expected}")
        if obj.get("caption") is not None and not isinstance(obj["caption"], str):
            raise ValueError(f"{where}: 'caption' must be a string")
        image = (path.parent / obj["image"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image file not found: {image}")
        extra = {k: v for k, v in obj.items() if k not in ("image", "caption")}
        entries.append(Entry(image, obj.get("caption"), extra or None))
    return entries


def _folder_entries(root: Path) -> list[Entry]:
    entries = []
    for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        except UnicodeDecodeError:
            raise ValueError(f"{txt}: caption file is not UTF-8 text") from None
        entries.append(Entry(p.resolve(), caption))
    return entries


def parse_world(src: str) -> tuple[str, int] | None:
    kind, sep, count = src.partition(":")
    if not sep or kind not in ("shapes", "mnist"):
        return None
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"source {src!r}: expected {kind}:N with N a whole number") from None
    if n < 1:
        raise ValueError(f"source {src!r}: N must be >= 1")
    return kind, n


def source_entries(src: str, images: Path | None, seed: int = 0) -> list[Entry]:
    """What `scan` will list: world items (written into `images`), JSONL lines or a folder's images."""
    world = parse_world(src)
    if world is not None:
        if images is None:
            raise ValueError(f"source {src!r} needs an images folder to write the world's images into")
        if images.exists() and not images.is_dir():
            raise ValueError(f"images folder {images} is a file")
        return _world_entries(world[0], world[1], images.resolve(), seed)
    path = Path(src)
    if path.is_dir():
        entries = _folder_entries(path)
    elif path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise ValueError(f"source {src}: give an image folder, a .jsonl file, shapes:N or mnist:N")
        entries = _jsonl_entries(path)
    else:
        raise FileNotFoundError(f"source not found: {src} (give an image folder, a .jsonl file, shapes:N or mnist:N)")
    if not entries:
        raise ValueError(f"source {src} has no images")
    for e in entries:  # headers only: a file that is not an image fails before anything is written
        try:
            with Image.open(e.path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {e.path}: {' '.join(str(err).split())}") from None
    return entries


def scan(src: str, out: Path, images: Path | None = None, seed: int = 0, save_every: int = 1000,
         progress: bool = True) -> list[dict]:
    out = check_manifest_path(out)
    entries = source_entries(src, images, seed)
    rows = read_manifest(out) if out.exists() else []
    if len(rows) > len(entries) or any(r["path"] != str(e.path) for r, e in zip(rows, entries)):
        raise ValueError(f"{out} holds another source's rows; give a new --out (or delete it) to scan {src}")
    rows += [{"id": i, "path": str(e.path)} for i, e in enumerate(entries) if i >= len(rows)]

    def work(chunk: list[dict]) -> list[dict]:
        updates = []
        for row in chunk:
            e = entries[row["id"]]
            if e.make is not None and not e.path.is_file():
                e.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = e.path.with_name(f".{e.path.stem}.tmp{e.path.suffix}")
                e.make(tmp)
                tmp.replace(e.path)
            image = load_image(e.path)
            updates.append({"sha256": file_sha256(e.path), "width": image.width, "height": image.height,
                            "caption": e.caption, "meta": json.dumps(e.meta) if e.meta else None})
        return updates

    run_step(rows, out, lambda r: r.get("sha256") is None, work, "scan", batch_size=32, save_every=save_every,
             progress=progress)
    return rows


# ----------------------------------------------------------------------------- dedupe


def mark_duplicates(rows: list[dict], threshold: int, colour_tolerance: float = 48.0) -> int:
    """duplicate_of = the first earlier kept row with the same SHA-256, or with a pHash within `threshold` bits
    and an opponent-colour signature within `colour_tolerance` (pHash alone is blind to colour)."""
    hashes = to_words([r["phash"] for r in rows])
    colours = chroma_array([r["chroma"] for r in rows])
    keepers: list[int] = []
    first_by_sha: dict[str, int] = {}
    n_dup = 0
    for i, row in enumerate(rows):
        dup = first_by_sha.get(row["sha256"])
        if dup is None and keepers:
            k = np.asarray(keepers)
            near = k[hamming(hashes[k], hashes[i]) <= threshold]
            if len(near):
                near = near[chroma_distance(colours[near], colours[i]) <= colour_tolerance]
            if len(near):
                dup = int(near[0])
        row["duplicate_of"] = dup
        if dup is None:
            first_by_sha[row["sha256"]] = i
            keepers.append(i)
        else:
            n_dup += 1
    return n_dup


def dedupe(manifest: Path, threshold: int = 12, out: Path | None = None, save_every: int = 1000,
           progress: bool = True, colour_tolerance: float = 48.0) -> dict:
    if not 0 <= colour_tolerance <= 510:
        raise ValueError(f"--colour-tolerance must be in 0..510, got {colour_tolerance}")
    if not 0 <= threshold <= 256:
        raise ValueError(f"--threshold must be in 0..256 bits (of the 256-bit pHash), got {threshold}")
    rows, out = _open(manifest, out, needs=("sha256",), step="dedupe")

    def work(chunk):
        out_ = []
        for row in chunk:
            image = load_image(row)
            out_.append({"phash": phash(image), "chroma": chroma(image)})
        return out_

    run_step(rows, out, lambda r: len(r.get("phash") or "") != PHASH_SIZE ** 2 // 4 or not r.get("chroma"), work, "dedupe", save_every=save_every, progress=progress)
    n_dup = mark_duplicates(rows, threshold, colour_tolerance)
    write_manifest(rows, out)
    return {"rows": len(rows), "duplicates": n_dup, "threshold": threshold, "colour_tolerance": colour_tolerance}


def _rows(manifest: Path) -> list[dict]:
    """The manifest's rows; an empty manifest is refused (no step has work in it)."""
    rows = read_manifest(manifest)
    if not rows:
        raise ValueError(f"{manifest} has no rows")
    return rows


def _out_file(out: Path, suffix: str) -> Path:
    """--out as a file path with this suffix (checked before any work)."""
    out = Path(out)
    if out.suffix.lower() != suffix or out.is_dir():
        raise ValueError(f"--out {out} must be a {suffix} file")
    return out


def _open(manifest: Path, out: Path | None, needs: tuple[str, ...], step: str) -> tuple[list[dict], Path]:
    rows = _rows(manifest)
    missing = [k for k in needs if any(r.get(k) is None for r in rows)]
    if missing:
        raise ValueError(f"{manifest}: column(s) {missing} are missing or incomplete; run "
                         f"{'scan' if missing[0] == 'sha256' else 'the earlier steps'} before {step}")
    out = check_manifest_path(out if out is not None else manifest, "--out")
    return rows, out


# ----------------------------------------------------------------------------- categorize


def _shape_spec(row: dict):
    """(kind, [(count, color, shape, size)], relation) from the world's scene, else parsed from the caption."""
    from ernielab.worlds.shapes import parse_prompt

    m = meta(row)
    if m.get("world") == "shapes":
        s = m["scene"]
        objs = s["objects"]
        if s["kind"] == "count":
            return "count", [(len(objs), objs[0]["color"], objs[0]["shape"], objs[0]["size"])], None, objs
        return s["kind"], [(1, o["color"], o["shape"], o["size"]) for o in objs], s.get("relation"), objs
    if not row.get("caption"):
        raise ValueError(f"{row['path']}: the shapes classifier needs shapes-world ground truth or a caption")
    try:
        spec = parse_prompt(row["caption"])
    except ValueError as e:
        raise ValueError(f"{row['path']}: caption is not a shapes-world prompt ({e})") from None
    return spec.kind, [(o.count, o.color, o.shape, o.size) for o in spec.objects], spec.relation, None


def shapes_category(row: dict) -> str:
    """'single circle', 'count square', 'relation circle+triangle': kind and shapes, colours left out."""
    kind, objs, _, _ = _shape_spec(row)
    return f"{kind} {'+'.join(sorted(o[2] for o in objs))}"


def _digit_labels(rows: list[dict], images=None) -> list[int]:
    labels: list[int | None] = [meta(r).get("label") for r in rows]
    rest = [i for i, lab in enumerate(labels) if lab is None]
    if rest:
        from ernielab.worlds.digits import classify_digits

        pics = images or [load_image(r) for r in rows]
        predicted = classify_digits(np.stack([np.asarray(pics[i].convert("RGB").resize((32, 32))) for i in rest])
                                    .transpose(0, 3, 1, 2))
        for i, p in zip(rest, predicted.tolist()):
            labels[i] = int(p)
    return [int(x) for x in labels]


def resolve_classifier(spec: str) -> Callable[[list[dict]], list[str]]:
    """A built-in ('shapes', 'digits') or 'module:callable' -> a function from rows to category names.
    A user callable gets (images: list of RGB PIL images, rows: list of manifest dicts) and returns strings."""
    if spec == "shapes":
        return lambda rows: [shapes_category(r) for r in rows]
    if spec == "digits":
        return lambda rows: [f"digit {d}" for d in _digit_labels(rows)]
    fn = load_callable(spec, "classifier")

    def user(rows):
        result = list(fn([load_image(r) for r in rows], rows))
        if not all(isinstance(c, str) and c for c in result):
            raise ValueError(f"classifier {spec!r} must return one non-empty string per image")
        return result

    return user


def categorize(manifest: Path, classifier: str = "shapes", out: Path | None = None, redo: bool = False,
               batch_size: int = 256, save_every: int = 1000, progress: bool = True) -> dict:
    fn = resolve_classifier(classifier)
    rows, out = _open(manifest, out, needs=("sha256",), step="categorize")
    if redo:
        for r in rows:
            r["category"] = None
    run_step(rows, out, lambda r: r.get("category") is None,
             lambda chunk: [{"category": c} for c in fn(chunk)], "categorize", batch_size, save_every, progress)
    return {"rows": len(rows), "categories": dict(Counter(r["category"] for r in rows).most_common())}


# ----------------------------------------------------------------------------- caption


_WHERE = {(0, 0): "upper left", (1, 0): "top", (2, 0): "upper right", (0, 1): "left", (1, 1): "centre",
          (2, 1): "right", (0, 2): "lower left", (1, 2): "bottom", (2, 2): "lower right"}


def shapes_caption(row: dict, level: str) -> str:
    """Ground-truth captions of a shapes-world image: short = the shapes, medium = colours, counts and the
    relation, detailed = also sizes, where each object is and the background."""
    from ernielab.worlds.shapes import NUMBER_WORDS, RELATION_PHRASES, object_phrase

    kind, objs, relation, boxes = _shape_spec(row)
    if level == "short":
        parts = [("a " if n == 1 else NUMBER_WORDS[n] + " ") + shape + ("s" if n > 1 else "")
                 for n, _, shape, _ in objs]
        return " and ".join(parts)
    phrases = [object_phrase(color, shape, n, size if level == "detailed" else None) for n, color, shape, size in objs]
    text = f"{phrases[0]} {RELATION_PHRASES[relation]} {phrases[1]}" if relation else phrases[0]
    if level == "medium":
        return text
    width, height = row.get("width") or 32, row.get("height") or 32
    if boxes:
        places = []
        for o in boxes:
            x0, y0, x1, y1 = o["bbox"]
            cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
            places.append(f"the {o['color']} {o['shape']} in the {_WHERE[(min(int(cx * 3), 2), min(int(cy * 3), 2))]}")
        where = "; " + ", ".join(dict.fromkeys(places))
    else:
        where = ""
    return f"{text}{where}; flat colours on a plain black background, {width}x{height} pixels"


def digits_caption(label: int, row: dict, level: str) -> str:
    from ernielab.worlds.mnist import NUMBER_WORDS

    if level == "short":
        return f"the digit {label}"
    if level == "medium":
        return f"a handwritten digit {NUMBER_WORDS[label]}"
    return (f"a handwritten digit {NUMBER_WORDS[label]} ({label}), white strokes centred on a black background, "
            f"{row.get('width')}x{row.get('height')} pixels")


def resolve_captioner(spec: str) -> Callable[[list[dict], str], list[str]]:
    """A built-in ('shapes', 'digits') or 'module:callable' -> a function (rows, level) -> captions. A user
    callable gets (images: list of RGB PIL images, rows: list of manifest dicts, level: str)."""
    if spec == "shapes":
        return lambda rows, level: [shapes_caption(r, level) for r in rows]
    if spec == "digits":
        return lambda rows, level: [digits_caption(d, r, level) for d, r in zip(_digit_labels(rows), rows)]
    fn = load_callable(spec, "captioner")

    def user(rows, level):
        result = list(fn([load_image(r) for r in rows], rows, level))
        if not all(isinstance(c, str) for c in result):
            raise ValueError(f"captioner {spec!r} must return one string per image")
        return result

    return user


def parse_levels(levels: str) -> list[str]:
    out = [level.strip() for level in levels.split(",") if level.strip()]
    if not out:
        raise ValueError("--levels is empty")
    bad = [level for level in out if not level.replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"--levels: {bad} are not simple names (letters, digits, _)")
    return out


def caption(manifest: Path, captioner: str = "shapes", levels: str = ",".join(LEVELS), out: Path | None = None,
            redo: bool = False, batch_size: int = 256, save_every: int = 1000, progress: bool = True) -> dict:
    names = parse_levels(levels)
    if captioner in ("shapes", "digits") and set(names) - set(LEVELS):
        raise ValueError(f"--levels: the {captioner} captioner knows {list(LEVELS)}, not {sorted(set(names) - set(LEVELS))}")
    fn = resolve_captioner(captioner)
    rows, out = _open(manifest, out, needs=("sha256",), step="caption")
    columns = [f"caption_{level}" for level in names]
    if redo:
        for r in rows:
            r.update(dict.fromkeys(columns))

    def work(chunk):
        per_level = {c: fn(chunk, level) for c, level in zip(columns, names)}
        return [{c: per_level[c][i] for c in columns} for i in range(len(chunk))]

    run_step(rows, out, lambda r: any(r.get(c) is None for c in columns), work, "caption", batch_size, save_every,
             progress)
    return {"rows": len(rows), "columns": columns}


# ----------------------------------------------------------------------------- score


def score(manifest: Path, model: Path | None = None, out: Path | None = None, redo: bool = False,
          batch_size: int = 64, save_every: int = 1000, progress: bool = True) -> dict:
    from ernielab.aesthetic.scorer import load_scorer

    scorer = load_scorer(model)
    rows, out = _open(manifest, out, needs=("sha256",), step="score")
    if redo:
        for r in rows:
            r["aesthetic"] = None

    def work(chunk):
        values = scorer.score([np.asarray(load_image(r)) for r in chunk], batch_size=batch_size).tolist()
        return [{"aesthetic": float(v)} for v in values]

    run_step(rows, out, lambda r: r.get("aesthetic") is None, work, "score", batch_size, save_every, progress)
    values = np.array([r["aesthetic"] for r in rows])
    return {"rows": len(rows), "scorer": scorer.config.backbone, "mean": float(values.mean()),
            "std": float(values.std())}


# ----------------------------------------------------------------------------- sample


def sampler_from_rows(rows: list[dict], alpha: float = 0.5, beta: float = 1.0, temperature: float = 1.0,
                      use_scores: bool = True):
    """The two-level sampler of a manifest: its categories, its aesthetic scores (if scored), duplicates excluded."""
    from ernielab.worlds.sampling import TwoLevelSampler

    if any(r.get("category") is None for r in rows):
        raise ValueError("the manifest has rows without a category; run `ernielab data categorize` first")
    exclude = [r.get("duplicate_of") is not None for r in rows]
    scores = None
    if use_scores and any(r.get("aesthetic") is not None for r in rows):
        if any(r.get("aesthetic") is None for r, x in zip(rows, exclude) if not x):
            raise ValueError("some rows have no aesthetic score; finish `ernielab data score` first (or --no-scores)")
        scores = [np.nan if r.get("aesthetic") is None else r["aesthetic"] for r in rows]
    return TwoLevelSampler([r["category"] for r in rows], scores, alpha=alpha, beta=beta, temperature=temperature,
                           exclude=exclude)


def sample(manifest: Path, out: Path, n: int, seed: int = 0, alpha: float = 0.5, beta: float = 1.0,
           temperature: float = 1.0, use_scores: bool = True) -> dict:
    import os

    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    out = _out_file(out, ".json")
    rows = _rows(manifest)
    sampler = sampler_from_rows(rows, alpha, beta, temperature, use_scores)
    indices = sampler.sample(n, seed)
    drawn = Counter(rows[i]["category"] for i in indices.tolist())
    report = {"manifest": str(manifest), "n": n, "seed": seed, "alpha": alpha, "beta": beta,
              "temperature": temperature, "scored": use_scores and any(r.get("aesthetic") is not None for r in rows),
              "excluded_duplicates": int(sum(r.get("duplicate_of") is not None for r in rows)),
              "category_weights": sampler.category_weights(),
              "category_share": {c: drawn[c] / n for c in sampler.categories},
              "indices": indices.tolist()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


# ----------------------------------------------------------------------------- export


def _export_columns(rows: list[dict], captions: str) -> list[str]:
    present = dict.fromkeys(k for r in rows for k in r)
    if captions.strip() == "all":
        names = [k for k in present if k == "caption" or k.startswith("caption_")] + \
            (["prompts"] if "prompts" in present else [])
    else:
        names = list(dict.fromkeys(c.strip() for c in captions.split(",") if c.strip()))
        missing = [c for c in names if c not in present]
        if missing:
            raise ValueError(f"--captions: {missing} are not columns of the manifest (it has "
                             f"{[k for k in present if k.startswith('caption') or k == 'prompts']})")
    if not names:
        raise ValueError("--captions: the manifest has no caption columns; run `ernielab data caption` "
                         "(or diversify) first")
    return names


def row_texts(row: dict, columns: list[str]) -> list[tuple[str, str]]:
    """(source, text) pairs of a row: each caption column, each kept rewrite ('prompts:<style>'); no repeats."""
    pairs: dict[str, str] = {}
    for c in columns:
        if c == "prompts":
            for p in row.get("prompts") or []:
                pairs.setdefault(p["text"], f"prompts:{p['style']}")
        elif isinstance(row.get(c), str) and row[c].strip():
            pairs.setdefault(row[c].strip(), c)
    return [(source, text) for text, source in pairs.items()]


def export(manifest: Path, out: Path, captions: str = "all", one_per_image: bool = False, seed: int = 0,
           keep_duplicates: bool = False) -> dict:
    """A JSONL of {"image", "caption", "id", "from"} lines for `data.kind=folder`: every text of every kept
    image (or one per image, drawn from (seed, id)); duplicates are left out unless `keep_duplicates`."""
    out = _out_file(out, ".jsonl")
    rows = _rows(manifest)
    columns = _export_columns(rows, captions)
    lines, without = [], 0
    for row in rows:
        if row.get("duplicate_of") is not None and not keep_duplicates:
            continue
        pairs = row_texts(row, columns)
        if not pairs:
            without += 1
            continue
        if one_per_image:
            pairs = [pairs[int(np.random.default_rng([seed, row["id"]]).integers(len(pairs)))]]
        lines += [{"image": row["path"], "caption": text, "id": row["id"], "from": source} for source, text in pairs]
    if not lines:
        raise ValueError(f"nothing to export: no row of {manifest} has a text in {columns}")
    write_manifest(lines, out)  # the same atomic JSONL writer (every line has the same keys)
    return {"out": str(out), "lines": len(lines), "images": len({x["id"] for x in lines}), "columns": columns,
            "rows_without_text": without}
