"""`ernielab data`: the corpus toolchain end to end on a folder of MNIST digit PNGs (long-tailed digit counts,
planted exact and near duplicates), resume after an interruption, the two-level sampler, and bad inputs."""
from __future__ import annotations

import io
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ernielab.corpus.cli import app
from ernielab.corpus.manifest import read_manifest
from ernielab.worlds.sampling import TwoLevelSampler

COUNTS = [40, 30, 20, 12, 8, 5, 3, 3, 2, 2]  # images of digit 0..9: a long tail
runner = CliRunner()


def run(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def near_copies(path: Path) -> dict[str, Image.Image]:
    image = Image.open(path).convert("L")
    arr = np.asarray(image).astype(int)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=70)
    return {"bright": Image.fromarray(np.clip(arr + 20, 0, 255).astype(np.uint8)),
            "noise": Image.fromarray(np.clip(arr + np.random.default_rng(0).integers(-8, 9, arr.shape), 0, 255)
                                     .astype(np.uint8)),
            "upscaled": image.resize((56, 56), Image.BICUBIC),
            "jpeg": Image.open(io.BytesIO(buf.getvalue()))}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """125 MNIST digits as PNG files (digit in the name), plus 2 exact and 4 near copies -> {copy: original}."""
    from ernielab.worlds.mnist import _mnist_arrays

    pixels, labels = _mnist_arrays()
    root = tmp_path_factory.mktemp("digits")
    for d, count in enumerate(COUNTS):
        for j, i in enumerate(np.flatnonzero(labels == d)[:count]):
            Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8), "L").save(root / f"d{d}_{j:03d}.png")
    planted = {}
    for name in ("d0_001.png", "d3_002.png"):
        shutil.copy(root / name, root / f"z_exact_{name}")
        planted[f"z_exact_{name}"] = name
    for (kind, image), name in zip(near_copies(root / "d1_004.png").items(), ["d1_004.png"] * 4):
        image.save(root / f"z_near_{kind}_{name}")
        planted[f"z_near_{kind}_{name}"] = name
    return root, planted


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """A user's classifier and captioner, importable as `mycorpus:...` (what a zero-shot model would plug into)."""
    root = tmp_path_factory.mktemp("user")
    (root / "mycorpus.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def classify(images, rows):\n"
        "    CALLS.append(len(rows))\n"
        "    assert all(im.mode == 'RGB' for im in images)\n"
        "    return ['digit ' + Path(r['path']).name.split('d')[-1][0] for r in rows]\n"
        "def interrupt_after(n):\n"
        "    def classify_or_stop(images, rows):\n"
        "        if sum(CALLS) >= n:\n"
        "            raise KeyboardInterrupt\n"
        "        return classify(images, rows)\n"
        "    return classify_or_stop\n"
        "stop_at_64 = interrupt_after(64)\n"
        "def caption(images, rows, level):\n"
        "    return [f'{level} caption of {Path(r[\"path\"]).name} ({im.width}px)' for im, r in zip(images, rows)]\n")
    sys.path.insert(0, str(root))
    import mycorpus

    yield mycorpus
    sys.path.remove(str(root))
    sys.modules.pop("mycorpus", None)


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    """A small pixel-feature aesthetic scorer (the shipped one runs Inception: minutes on CPU)."""
    import torch

    from ernielab.aesthetic.scorer import AestheticConfig, AestheticScorer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scorer")
    AestheticScorer(AestheticConfig(backbone="pixels:8", feature_dim=192, hidden=0, dropout=0.0)).save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_end_to_end_on_mnist_folder(digits_folder, user_module, scorer_dir, tmp_path, suffix):
    root, planted = digits_folder
    manifest = tmp_path / f"corpus{suffix}"
    run("scan", root, "--out", manifest)
    rows = read_manifest(manifest)
    assert len(rows) == sum(COUNTS) + len(planted)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["d0_000.png"]["width"] == 28 and by_name["z_near_upscaled_d1_004.png"]["width"] == 56
    assert by_name["z_exact_d0_001.png"]["sha256"] == by_name["d0_001.png"]["sha256"]
    assert all(r["caption"] is None for r in rows)

    out = json.loads(run("dedupe", manifest).stdout)
    rows = read_manifest(manifest)
    found = {Path(r["path"]).name: Path(rows[r["duplicate_of"]]["path"]).name
             for r in rows if r["duplicate_of"] is not None}
    assert found == planted, found  # every planted copy, pointing at its original, and nothing else
    assert out["duplicates"] == len(planted)

    run("categorize", manifest, "--classifier", "mycorpus:classify")
    run("caption", manifest, "--captioner", "digits")
    run("caption", manifest, "--captioner", "mycorpus:caption", "--levels", "alt")
    run("score", manifest, "--model", scorer_dir)
    rows = read_manifest(manifest)
    assert Counter(r["category"] for r in rows if r["duplicate_of"] is None) == {
        f"digit {d}": c for d, c in enumerate(COUNTS)}
    row = by_name["d3_000.png"]
    row = rows[row["id"]]
    # the digits captioner reads the digit with the shipped CNN (no labels in a plain folder)
    assert row["caption_short"] == "the digit 3" and row["caption_medium"] == "a handwritten digit three"
    assert "28x28 pixels" in row["caption_detailed"]
    assert row["caption_alt"] == "alt caption of d3_000.png (28px)"
    assert all(np.isfinite(r["aesthetic"]) for r in rows)

    sample = tmp_path / "sample.json"
    run("sample", manifest, "--out", sample, "-n", 4000, "--alpha", 0.5)
    report = json.loads(sample.read_text())
    dup_ids = {r["id"] for r in rows if r["duplicate_of"] is not None}
    assert not dup_ids & set(report["indices"])  # duplicates are never drawn
    run("sample", manifest, "--out", tmp_path / "again.json", "-n", 4000, "--alpha", 0.5)
    assert json.loads((tmp_path / "again.json").read_text())["indices"] == report["indices"]  # seeded
    rare = {f"digit {d}" for d in range(5, 10)}  # 15 of 125 unique images = 12%
    uniform = sum(c for d, c in enumerate(COUNTS) if d >= 5) / sum(COUNTS)

    def rare_share(report):
        return sum(rows[i]["category"] in rare for i in report["indices"]) / len(report["indices"])

    assert rare_share(report) > 1.3 * uniform, (rare_share(report), uniform)  # measured 0.167 vs 0.120
    run("sample", manifest, "--out", tmp_path / "b0.json", "-n", 4000, "--alpha", 0.5, "--beta", 0)
    size_only = json.loads((tmp_path / "b0.json").read_text())
    assert rare_share(size_only) > 2 * uniform  # sqrt-size weights: 0.274 expected, measured 0.285

    pairs = tmp_path / "train.jsonl"
    run("export", manifest, "--out", pairs, "--captions", "caption_short,caption_alt")
    lines = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(lines) == 2 * sum(COUNTS) and not dup_ids & {x["id"] for x in lines}  # duplicates left out
    assert {x["caption"] for x in lines if x["id"] == row["id"]} == {row["caption_short"], row["caption_alt"]}


def test_interrupted_step_resumes(digits_folder, user_module, tmp_path):
    root, _ = digits_folder
    manifest = tmp_path / "m.parquet"
    run("scan", root, "--out", manifest, "--save-every", 50)
    user_module.CALLS.clear()
    result = run("categorize", manifest, "--classifier", "mycorpus:stop_at_64", "--batch-size", 16, ok=False)
    assert result.exit_code != 0
    rows = read_manifest(manifest)  # what was done before the interruption was saved
    assert sum(r["category"] is not None for r in rows) == 64
    user_module.CALLS.clear()
    run("categorize", manifest, "--classifier", "mycorpus:classify", "--batch-size", 16)
    assert sum(user_module.CALLS) == len(rows) - 64  # only the rest was classified
    assert all(r["category"] for r in read_manifest(manifest))


def test_scan_resumes_and_worlds(tmp_path):
    manifest = tmp_path / "w.jsonl"
    run("scan", "mnist:30", "--out", manifest)
    rows = read_manifest(manifest)
    assert len(rows) == 30 and all(r["caption"] for r in rows)
    assert Path(rows[0]["path"]).parent == tmp_path / "w_images"
    # an interrupted scan: drop the last rows' hashes, as if it stopped there; the rerun fills only those in
    text = manifest.read_text().splitlines()
    partial = [json.loads(line) for line in text]
    for r in partial[20:]:
        r.update(sha256=None, width=None, height=None)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in partial))
    run("scan", "mnist:30", "--out", manifest)
    assert read_manifest(manifest) == rows
    shapes = tmp_path / "s.parquet"
    run("scan", "shapes:40", "--out", shapes)
    run("categorize", shapes)
    run("caption", shapes)
    rows = read_manifest(shapes)
    meta = json.loads(rows[0]["meta"])["scene"]
    assert rows[0]["category"].split()[0] == meta["kind"]
    assert len(rows[0]["caption_short"]) < len(rows[0]["caption_medium"]) < len(rows[0]["caption_detailed"])
    from ernielab.corpus.steps import shapes_caption, shapes_category

    # from the world's captions alone (no ground truth): the same categories, captions with the same words
    # (a relation caption may name the objects the other way round)
    assert [shapes_category({**r, "meta": None}) for r in rows] == [r["category"] for r in rows]
    assert all(sorted(shapes_caption({**r, "meta": None}, "short").split()) == sorted(r["caption_short"].split())
               for r in rows)
    assert {r["caption_medium"].split()[1] for r in rows if r["category"].startswith("single")} <= {
        "red", "green", "blue", "yellow", "purple", "cyan", "orange", "white", "magenta", "pink", "brown", "gray"}


def test_scan_jsonl_and_folder_captions(digits_folder, tmp_path):
    root, _ = digits_folder
    (tmp_path / "imgs").mkdir()
    shutil.copy(root / "d2_000.png", tmp_path / "imgs" / "a.png")
    shutil.copy(root / "d4_000.png", tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "a.txt").write_text("a two\n")
    run("scan", tmp_path / "imgs", "--out", tmp_path / "f.jsonl")
    assert [r["caption"] for r in read_manifest(tmp_path / "f.jsonl")] == ["a two", None]
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "imgs/a.png", "caption": "two", "source": "web"}\n\n{"image": "imgs/b.png"}\n')
    run("scan", data, "--out", tmp_path / "j.parquet")
    rows = read_manifest(tmp_path / "j.parquet")
    assert [r["caption"] for r in rows] == ["two", None] and json.loads(rows[0]["meta"]) == {"source": "web"}
    assert rows[0]["path"] == str((tmp_path / "imgs" / "a.png").resolve())


def test_two_level_sampler_lifts_the_tail_and_is_deterministic():
    cats = np.repeat(np.arange(10), [500, 200, 100, 50, 20, 10, 5, 5, 5, 5])
    scores = np.random.default_rng(0).normal(size=len(cats))
    exclude = np.zeros(len(cats), bool)
    exclude[::7] = True
    sampler = TwoLevelSampler(cats, scores, alpha=0.5, beta=0.0, exclude=exclude)
    idx = sampler.sample(20000, seed=1)
    assert not exclude[idx].any()
    rare = cats[idx] >= 5
    usable = ~exclude
    uniform = (cats[usable] >= 5).sum() / usable.sum()
    assert rare.mean() > 3 * uniform  # ~0.21 vs ~0.03
    assert sampler.batch_indices(8, seed=3, k=5) == sampler.batch_indices(8, seed=3, k=5)
    assert sampler.batch_indices(8, seed=3, k=5) != sampler.batch_indices(8, seed=3, k=6)
    assert np.isclose(sampler.item_probabilities().sum(), 1)
    flat = TwoLevelSampler(cats, None, alpha=1.0, beta=0.0)  # alpha 1, no scores: uniform over images
    assert np.allclose(flat.item_probabilities(), 1 / len(cats))
    # within a category a low temperature prefers the best-scored image
    sharp = TwoLevelSampler(cats, scores, alpha=0.5, temperature=0.05)
    best0 = np.flatnonzero(cats == 0)[np.argmax(scores[cats == 0])]
    assert (sharp.sample(2000, seed=0)[cats[sharp.sample(2000, seed=0)] == 0] == best0).mean() > 0.9
    for bad in (dict(alpha=-1), dict(temperature=0), dict(beta=float("nan"))):
        with pytest.raises(ValueError):
            TwoLevelSampler(cats, scores, **bad)


def test_bad_inputs(digits_folder, tmp_path):
    root, _ = digits_folder
    manifest = tmp_path / "m.jsonl"
    run("scan", root, "--out", manifest)
    (tmp_path / "not_image.png").write_text("nope")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "missing.png"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    text_manifest = tmp_path / "t.parquet"
    text_manifest.write_text("not parquet")
    bad_folder = tmp_path / "badfolder"
    bad_folder.mkdir()
    shutil.copy(tmp_path / "not_image.png", bad_folder / "x.png")
    cases = [
        ("scan", tmp_path / "nowhere", "--out", tmp_path / "o.parquet"),
        ("scan", root, "--out", tmp_path / "o.csv"),
        ("scan", bad_jsonl, "--out", tmp_path / "o.parquet"),
        ("scan", broken, "--out", tmp_path / "o.parquet"),
        ("scan", bad_folder, "--out", tmp_path / "o.parquet"),
        ("scan", "mnist:0", "--out", tmp_path / "o.parquet"),
        ("scan", "mnist:99999", "--out", tmp_path / "o.parquet"),
        ("scan", "shapes:x", "--out", tmp_path / "o.parquet"),
        ("scan", "mnist:5", "--out", manifest),  # holds another source's rows
        ("scan", root, "--out", "/sys/ernielab-out/m.parquet"),
        ("dedupe", tmp_path / "none.parquet"),
        ("dedupe", text_manifest),
        ("dedupe", manifest, "--threshold", 300),
        ("categorize", manifest, "--classifier", "nope"),
        ("categorize", manifest, "--classifier", "no_such_module:f"),
        ("categorize", manifest, "--classifier", "json:no_such_attr"),
        ("categorize", manifest, "--classifier", "shapes"),  # digits have no shapes caption
        ("caption", manifest, "--levels", ""),
        ("caption", manifest, "--captioner", "digits", "--levels", "epic"),
        ("score", manifest, "--model", tmp_path),
        ("sample", manifest, "--out", tmp_path / "s.json", "-n", 10),  # not categorized yet
        ("sample", manifest, "--out", tmp_path / "s.txt", "-n", 10),
        ("sample", manifest, "--out", tmp_path / "s.json", "-n", 0),
    ]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for args in cases:
        result = run(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip() and "it/s" not in line
                 and "img/s" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed


def test_benchmark_smoke(tmp_path):
    from ernielab.corpus.bench import main

    report = main(["--smoke", "--out", str(tmp_path)])
    assert report["n_images"] == 100 and len(report["seconds_per_1000_images"]) == 6
    assert json.loads((tmp_path / "timings.json").read_text()) == report
