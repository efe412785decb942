"""`ernielab data diversify` and `data export`: N rewrites per image in user styles, by a real causal LM (the bundled
tiny GPT-2 enhancer with a chat template; a random-weight Ministral3 without one) or by the shapes-world grammar;
seeded per rewrite (batch-independent), resumable, a --check hook whose rejections are recorded, bad inputs, and
the export that training reads (data.kind=folder)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ernielab.corpus.cli import app
from ernielab.corpus.diversify import PLAIN_PROMPT, STYLE_INSTRUCTIONS, LMRewriter, RowSampler, styles_for_row
from ernielab.corpus.manifest import read_manifest, write_manifest
from ernielab.worlds.shapes import COLORS

runner = CliRunner()
STYLES = ["short", "paraphrase", "detailed", "keywords", "digits"]
N_SHAPES = 8


def run(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory) -> Path:
    """N_SHAPES shapes-world images with ground truth in meta and captions at three levels."""
    root = tmp_path_factory.mktemp("shapes")
    manifest = root / "corpus.parquet"
    run("scan", f"shapes:{N_SHAPES}", "--out", manifest)
    run("caption", manifest)
    return manifest


@pytest.fixture(scope="module")
def folder_manifest(tmp_path_factory) -> Path:
    """A user's folder: 6 PNGs with free-text .txt captions (no world ground truth), scanned to JSONL."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    texts = ["a red kite over the sea", "two dogs on a sofa", "a bowl of 3 lemons", "a city street at night",
             "an old map on a wooden table", "five birds on a wire"]
    for i, text in enumerate(texts):
        Image.new("RGB", (16 + i, 16), (40 * i, 90, 200 - 30 * i)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(text)
    manifest = root / "corpus.jsonl"
    run("scan", root, "--out", manifest)
    return manifest


@pytest.fixture(scope="module")
def plain_lm(tmp_path_factory) -> Path:
    """A random-weight Ministral3 (the report's prompt-enhancer family) whose tokenizer has no chat template and
    no pad token."""
    import transformers
    from transformers import AutoTokenizer

    from ernielab.enhancer.model import DEFAULT_ENHANCER

    torch.manual_seed(0)
    rope = transformers.Ministral3Config().rope_parameters | {"original_max_position_embeddings": 32,
                                                              "max_position_embeddings": 512}  # YaRN x16
    config = transformers.Ministral3Config(
        vocab_size=470, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        bos_token_id=1, rope_parameters=rope)
    path = tmp_path_factory.mktemp("lm")
    transformers.Ministral3ForCausalLM(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_ENHANCER)
    tokenizer.chat_template = None
    tokenizer.pad_token = None  # like many base LMs: the rewriter pads with the end-of-sequence token
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def user_checks(tmp_path_factory):
    """--check callables: `odd_length` flags about half of any LM's rewrites (those of even length), whatever the
    LM's quality; `interruptible` passes everything but raises KeyboardInterrupt after STOP_AFTER[0] calls."""
    root = tmp_path_factory.mktemp("checks")
    (root / "mychecks.py").write_text(
        "CALLS = []\n"
        "STOP_AFTER = [None]\n"
        "def odd_length(caption, rewrite):\n"
        "    return [] if len(rewrite) % 2 else [f'even length {len(rewrite)}']\n"
        "def interruptible(caption, rewrite):\n"
        "    CALLS.append(1)\n"
        "    if STOP_AFTER[0] is not None and len(CALLS) > STOP_AFTER[0]:\n"
        "        raise KeyboardInterrupt\n"
        "    return []\n")
    sys.path.insert(0, str(root))
    import mychecks

    yield mychecks
    sys.path.remove(str(root))
    sys.modules.pop("mychecks", None)


def prompts_of(manifest: Path) -> list:
    return [r["prompts"] for r in read_manifest(manifest)]


def test_lm_rewriter_with_chat_template(shapes_manifest, tmp_path):
    out = tmp_path / "a.parquet"
    summary = json.loads(run("diversify", shapes_manifest, "--per-image", 3, "--max-new-tokens", 16,
                             "--out", out).stdout)
    assert summary["rewritten_now"] == N_SHAPES and summary["prompts"] + summary["rejected"] == 3 * N_SHAPES
    rows = read_manifest(out)
    for row in rows:
        styles = [p["style"] for p in row["prompts"]]
        assert len(styles) == 3 == len(set(styles)) and set(styles) <= set(STYLES)
        assert styles == styles_for_row(STYLES, 3, 0, row["id"])
        assert all(isinstance(p["text"], str) and p["text"] for p in row["prompts"])
        assert json.loads(row["prompts_by"])["rewriter"] == "lm"
    assert len({tuple(s["style"] for s in r["prompts"]) for r in rows}) > 1  # the style order is per image
    assert read_manifest(shapes_manifest)[0].get("prompts") is None  # --out leaves the input alone

    same = tmp_path / "b.jsonl"
    run("diversify", shapes_manifest, "--per-image", 3, "--max-new-tokens", 16, "--batch-size", 5, "--out", same)
    assert prompts_of(same) == prompts_of(out)  # seeded per rewrite: batching does not matter
    other = tmp_path / "c.jsonl"
    run("diversify", shapes_manifest, "--per-image", 3, "--max-new-tokens", 16, "--seed", 1, "--out", other)
    assert prompts_of(other) != prompts_of(out)


def test_plain_prompt_lm_on_a_folder(folder_manifest, plain_lm, tmp_path):
    rewriter = LMRewriter(str(plain_lm), max_new_tokens=8)
    assert rewriter.pad_id == rewriter.tokenizer.eos_token_id
    text = rewriter.prompt_text(STYLE_INSTRUCTIONS["keywords"], "two dogs on a sofa")
    assert text == PLAIN_PROMPT.format(instruction=STYLE_INSTRUCTIONS["keywords"], caption="two dogs on a sofa")
    out = tmp_path / "d.jsonl"
    run("diversify", folder_manifest, "--lm", plain_lm, "--styles", "short,words", "--per-image", 4,
        "--max-new-tokens", 8, "--batch-size", 4, "--out", out)
    rows = read_manifest(out)
    for row in rows:
        kept, rejected = row["prompts"], row["prompts_rejected"]
        assert len(kept) + len(rejected) == 4
        assert [p["style"] for p in kept + rejected].count("short") == 2  # 2 styles cycled over 4 rewrites
        assert all(p["problems"] == ["empty rewrite"] for p in rejected)
    by_one = tmp_path / "e.jsonl"
    run("diversify", folder_manifest, "--lm", plain_lm, "--styles", "short,words", "--per-image", 4,
        "--max-new-tokens", 8, "--batch-size", 1, "--out", by_one)
    assert prompts_of(by_one) == prompts_of(out)


def test_row_sampler_is_per_sequence_and_respects_top_p():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = RowSampler([7], 1.0, 1.0)(None, scores[1:2])
    batched = RowSampler([5, 7, 9], 1.0, 1.0)(None, scores)
    assert torch.equal(alone[0], batched[1])  # a row's draw does not depend on its neighbours
    assert (batched == 0).sum() == 3 and torch.isinf(batched).sum() == 3 * 49
    greedy = RowSampler([1, 2, 3], 1.0, 1e-6)(None, scores)
    assert torch.equal(greedy.argmax(-1), scores.argmax(-1))  # top-p -> 0 keeps the best token only
    draws = torch.stack([RowSampler([s], 1.0, 1.0)(None, scores[:1]).argmax(-1) for s in range(400)]).flatten()
    top = scores[0].softmax(-1).argmax()
    assert abs((draws == top).float().mean() - scores[0].softmax(-1)[top]) < 0.08


def test_check_hook_records_rejections(shapes_manifest, user_checks, tmp_path):
    out = tmp_path / "f.parquet"
    summary = json.loads(run("diversify", shapes_manifest, "--per-image", 2, "--max-new-tokens", 16,
                             "--check", "mychecks:odd_length", "--out", out).stdout)
    rows = read_manifest(out)
    rejected = [p for r in rows for p in r["prompts_rejected"]]
    assert sum(len(r["prompts"]) for r in rows) + len(rejected) == 2 * N_SHAPES and summary["rejected"] == len(rejected)
    for row in rows:
        assert all(len(p["text"]) % 2 for p in row["prompts"])
        assert all(p["problems"] == [f"even length {len(p['text'])}"] and p["attempt"] == 0
                   for p in row["prompts_rejected"])
    assert rejected

    retried = tmp_path / "r.parquet"
    run("diversify", shapes_manifest, "--per-image", 2, "--max-new-tokens", 16, "--check", "mychecks:odd_length",
        "--retries", 3, "--out", retried)
    for row, first in zip(read_manifest(retried), rows):
        assert all(len(p["text"]) % 2 for p in row["prompts"]) and len(row["prompts"]) <= 2
        assert [p for p in row["prompts_rejected"] if p["attempt"] == 0] == first["prompts_rejected"]
        assert sum(p["attempt"] == 3 for p in row["prompts_rejected"]) == 2 - len(row["prompts"])  # gave up
        assert len(row["prompts"]) >= len(first["prompts"])
    assert sum(len(r["prompts"]) for r in read_manifest(retried)) > sum(len(r["prompts"]) for r in rows)
    unchecked = tmp_path / "g.parquet"
    run("diversify", shapes_manifest, "--per-image", 2, "--max-new-tokens", 16, "--out", unchecked)
    assert [sorted(p["text"] for p in r["prompts"] + r["prompts_rejected"]) for r in rows] == \
        [sorted(p["text"] for p in r) for r in prompts_of(unchecked)]  # the check sorts the same rewrites


def test_resume_after_interruption(shapes_manifest, user_checks, tmp_path):
    args = ["--per-image", 2, "--max-new-tokens", 16, "--batch-size", 2, "--save-every", 2,
            "--check", "mychecks:interruptible"]
    resumed = tmp_path / "resumed.parquet"
    user_checks.CALLS.clear()
    user_checks.STOP_AFTER[0] = 9  # 4 checks per batch of 2 images: stops inside the third batch
    assert run("diversify", shapes_manifest, *args, "--out", resumed, ok=False).exit_code != 0
    assert [r["id"] for r in read_manifest(resumed) if r.get("prompts") is not None] == [0, 1, 2, 3]
    user_checks.STOP_AFTER[0] = None
    assert json.loads(run("diversify", resumed, *args).stdout)["rewritten_now"] == N_SHAPES - 4
    straight = tmp_path / "straight.parquet"
    run("diversify", shapes_manifest, *args, "--out", straight)
    assert prompts_of(resumed) == prompts_of(straight)
    assert json.loads(run("diversify", resumed, *args).stdout)["rewritten_now"] == 0  # all done: nothing to do


def test_grammar_rewriter_on_shapes_world(shapes_manifest, tmp_path):
    phrasing = pytest.importorskip("ernielab.worlds.phrasing")
    styles = list(phrasing.STYLES)
    out = tmp_path / "grammar.parquet"
    summary = json.loads(run("diversify", shapes_manifest, "--rewriter", "grammar", "--styles", ",".join(styles),
                             "--per-image", len(styles), "--out", out).stdout)
    assert summary["prompts"] == N_SHAPES * len(styles) and summary["rejected"] == 0
    for row in read_manifest(out):
        assert sorted(p["style"] for p in row["prompts"]) == sorted(styles)  # N = #styles: each style once
        assert len({p["text"] for p in row["prompts"]}) > 1
    again = tmp_path / "again.jsonl"
    run("diversify", shapes_manifest, "--rewriter", "grammar", "--styles", ",".join(styles), "--per-image",
        len(styles), "--out", again)
    assert prompts_of(again) == prompts_of(out)

    # Without ground truth (a user's JSONL of shapes captions) the grammar works from the parsed caption.
    bare = tmp_path / "bare.jsonl"
    write_manifest([{**r, "meta": None} for r in read_manifest(shapes_manifest)], bare)
    run("diversify", bare, "--rewriter", "grammar", "--styles", "paraphrase,keywords", "--per-image", 2,
        "--source", "caption_medium")
    for row in read_manifest(bare):
        colours = {w for w in row["caption_medium"].split() if w in COLORS}
        assert all(colours <= set(p["text"].replace(",", " ").split()) for p in row["prompts"])


def test_shapes_fact_check(shapes_manifest, tmp_path):
    pytest.importorskip("ernielab.worlds.phrasing")
    facts = pytest.importorskip("ernielab.worlds.prompt_facts")
    grammar = json.loads(run("diversify", shapes_manifest, "--rewriter", "grammar", "--per-image", 3,
                             "--styles", "template,paraphrase", "--check", "shapes",
                             "--out", tmp_path / "g.parquet").stdout)
    assert grammar["rejected"] == 0 and grammar["prompts"] == 3 * N_SHAPES  # a grammar keeps every fact
    lm = tmp_path / "l.parquet"
    run("diversify", shapes_manifest, "--per-image", 3, "--max-new-tokens", 16, "--check", "shapes", "--out", lm)
    for row in read_manifest(lm):
        source = row["caption_medium"]
        assert all(facts.contradictions(source, p["text"]) == [] for p in row["prompts"])
        assert all(facts.contradictions(source, p["text"]) == p["problems"] != [] for p in row["prompts_rejected"])


def test_export_feeds_the_folder_dataset(shapes_manifest, tmp_path):
    from ernielab.worlds.folder import ImageCaptionFolder

    manifest = tmp_path / "m.parquet"
    run("diversify", shapes_manifest, "--per-image", 2, "--max-new-tokens", 16, "--out", manifest)
    rows = read_manifest(manifest)
    pairs = tmp_path / "train.jsonl"
    summary = json.loads(run("export", manifest, "--out", pairs, "--captions", "caption_medium,prompts").stdout)
    expected = sum(len({r["caption_medium"], *(p["text"] for p in r["prompts"])}) for r in rows)
    assert summary["lines"] == expected and summary["images"] == N_SHAPES
    data = ImageCaptionFolder(pairs, image_size=32)
    assert len(data) == expected and data[0]["image"].shape == (3, 32, 32)
    texts = {r["id"]: {r["caption_medium"], *(p["text"] for p in r["prompts"])} for r in rows}
    lines = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert all(x["caption"] in texts[x["id"]] for x in lines)
    one, again = tmp_path / "one.jsonl", tmp_path / "again.jsonl"
    assert json.loads(run("export", manifest, "--out", one, "--one-per-image").stdout)["lines"] == N_SHAPES
    run("export", manifest, "--out", again, "--one-per-image")
    assert one.read_text() == again.read_text()  # the pick depends on (seed, id) only


def test_bad_inputs_write_nothing(shapes_manifest, tmp_path):
    before = shapes_manifest.read_bytes()
    done = tmp_path / "done.parquet"
    run("diversify", shapes_manifest, "--per-image", 1, "--max-new-tokens", 8, "--out", done)
    done_bytes = done.read_bytes()
    cases = [
        ("diversify", tmp_path / "missing.parquet"),
        ("diversify", shapes_manifest, "--styles", "short,poem"),
        ("diversify", shapes_manifest, "--styles", " , "),
        ("diversify", shapes_manifest, "--per-image", 0),
        ("diversify", shapes_manifest, "--per-image", 65),
        ("diversify", shapes_manifest, "--retries", -1),
        ("diversify", shapes_manifest, "--rewriter", "oracle"),
        ("diversify", shapes_manifest, "--lm", "nobody/no-such-model"),  # HF_HUB_OFFLINE: not cached
        ("diversify", shapes_manifest, "--lm", tmp_path),  # a folder that is not a model
        ("diversify", shapes_manifest, "--rewriter", "grammar", "--lm", tmp_path),
        ("diversify", shapes_manifest, "--check", "nomodule:fn"),
        ("diversify", shapes_manifest, "--source", "caption_poetic"),
        ("diversify", shapes_manifest, "--temperature", -1),
        ("diversify", shapes_manifest, "--device", "nodevice"),
        ("diversify", shapes_manifest, "--batch-size", 0),
        ("diversify", shapes_manifest, "--out", tmp_path / "x.csv"),
        ("diversify", done, "--per-image", 2),  # other settings than the rows already done
        ("export", shapes_manifest, "--out", tmp_path / "x.json"),
        ("export", shapes_manifest, "--out", tmp_path / "x.jsonl", "--captions", "prompts_typo"),
    ]
    for args in cases:
        result = run(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        lines = [x for x in result.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, (args, result.output)
    assert shapes_manifest.read_bytes() == before and done.read_bytes() == done_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.parquet"]
