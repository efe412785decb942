"""Stabilized Diffusion-DPO: the loss, the pair file, the pair maker, training, resume and the CLI."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.cli.main import app
from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.core.config import ConfigError
from ernielab.core.engine import Engine
from ernielab.dpo.preferences import AlignmentJudge, PreferencePairs, best_and_worst, load_judge, make_pairs, read_pairs
from ernielab.dpo.train import DPOSettings, DPOTrainConfig, DPOTrainer, dpo_loss
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.worlds.shapes import ShapesWorld, render

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def brightness_judge(prompts, images):
    """A real (if silly) pluggable judge: brighter is better."""
    return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]


def write_pair_set(folder, n=6, seed=0):
    """Pairs from the shapes world: chosen = the caption's true render, rejected = another scene's render."""
    world = ShapesWorld(1000, image_size=32, seed=seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene, text = world.scene(i)
        other, _ = world.scene(500 + i)
        Image.fromarray(render(scene)).save(folder / "img" / f"{i}_w.png")
        Image.fromarray(render(other)).save(folder / "img" / f"{i}_l.png")
        lines.append(json.dumps({"prompt": text, "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png", "id": i}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def dpo_config(tmp_path, pipe_dir, pairs, **kw):
    base = dict(init_from=str(pipe_dir), dpo=DPOSettings(pairs=str(pairs)), output_dir=str(tmp_path / "run"),
                steps=4, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, save_every=2, ema_decay=0.9)
    base.update(kw)
    return DPOTrainConfig(**base)


def built(trainer):
    """The trainer's modules as the engine builds them, without training."""
    from accelerate import Accelerator

    Engine(trainer, Accelerator(cpu=True))
    torch.manual_seed(trainer.config.seed)
    trainer.build()
    return trainer


def assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        assert s.keys() == b["state"][i].keys()
        assert all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(b["state"][i][k])) for k in s)


# ---- the loss -------------------------------------------------------------------------------------
def old_stabilized_loss(err_w, err_l, ref_w, ref_l, beta_eff=50.0, lambda_win=0.35, lambda_lose=0.15,
                        reward_units=True):
    """A verbatim copy of the pre-"report" `dpo_loss` expression: loss="hinge" must keep these numbers."""
    import torch.nn.functional as F

    delta_w, delta_l = err_w - ref_w, err_l - ref_l
    margin = -beta_eff * (delta_w - delta_l)
    dpo = -F.logsigmoid(margin)
    anchor_lose = F.relu(delta_l)
    if reward_units:
        anchors = beta_eff * (lambda_win * delta_w + lambda_lose * anchor_lose)
    else:
        anchors = lambda_win * err_w + lambda_lose * anchor_lose
    return (dpo + anchors).mean()


def test_default_is_the_report_loss():
    s = DPOSettings()
    assert (s.loss, s.beta, s.lambda_win, s.lambda_lose) == ("report", 0.05, 0.35, 0.15)
    with pytest.raises(ConfigError, match="dpo.loss: must be one of"):
        DPOTrainConfig.from_dict({"init_from": "default", "dpo": {"pairs": "p.jsonl", "loss": "sigmoid"}})


@pytest.mark.parametrize("beta_scale", [1000.0, 1.0])
def test_report_loss_matches_hand_computation(beta_scale):
    """L = -log sigma(-beta (Diff_policy - Diff_ref)) + lambda_win l_win + lambda_lose l_lose, l = the policy's
    errors, the lambda terms NOT scaled by beta (beta_scale 1: the report's beta literally)."""
    s = DPOSettings(beta_scale=beta_scale)  # loss "report", beta 0.05, lambdas 0.35 / 0.15: the defaults
    err_w, err_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.12, 0.20]), torch.tensor([0.29, 0.15])
    loss, stats = dpo_loss(err_w, err_l, ref_w, ref_l, s)
    beta = 0.05 * beta_scale
    expected = []
    for ew, el, rw, rl in zip(err_w.tolist(), err_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        diff_policy, diff_ref = ew - el, rw - rl
        x = -beta * (diff_policy - diff_ref)
        expected.append(-math.log(1 / (1 + math.exp(-x))) + 0.35 * ew + 0.15 * el)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # by hand, beta_scale 1000: pair 0 x = +1.5, pair 1 x = -2.5
    if beta_scale == 1000.0:
        by_hand = (math.log1p(math.exp(-1.5)) + 0.035 + 0.045 + math.log1p(math.exp(2.5)) + 0.07 + 0.015) / 2
        assert loss.item() == pytest.approx(by_hand, rel=1e-6)
        assert stats["reward_margin"].item() == pytest.approx(-0.5, rel=1e-5)
    else:  # the literal beta on per-element mean errors: the DPO term is ~log 2
        assert stats["dpo"].item() == pytest.approx(math.log(2), abs=2e-3)


def test_report_loss_gradient_signs():
    """Lowering err_w lowers the loss (d/d err_w > 0); the DPO term wants err_l up, the lambda_lose term down."""
    s = DPOSettings()
    err_w, err_l = torch.tensor([0.10], requires_grad=True), torch.tensor([0.35], requires_grad=True)
    loss, _ = dpo_loss(err_w, err_l, torch.tensor([0.12]), torch.tensor([0.30]), s)
    loss.backward()
    sig = torch.sigmoid(torch.tensor(-3.5)).item()  # sigmoid(-margin), margin = -50 * (-0.02 - 0.05)
    assert err_w.grad.item() == pytest.approx(50 * sig + 0.35, rel=1e-5) and err_w.grad.item() > 0
    assert err_l.grad.item() == pytest.approx(-50 * sig + 0.15, rel=1e-5)
    lower, _ = dpo_loss(torch.tensor([0.09]), torch.tensor([0.35]), torch.tensor([0.12]), torch.tensor([0.30]), s)
    assert lower.item() < loss.item()
    # at a saturated margin only the report's SFT terms remain: both errors are pulled down
    err_w, err_l = torch.tensor([0.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    dpo_loss(err_w, err_l, torch.tensor([0.5]), torch.tensor([0.5]), s)[0].backward()
    assert err_w.grad.item() == pytest.approx(0.35, rel=1e-4) and err_l.grad.item() == pytest.approx(0.15, rel=1e-3)


@pytest.mark.parametrize("reward_units", [True, False])
def test_hinge_equals_the_old_loss(reward_units):
    g = torch.Generator().manual_seed(0)
    err_w, err_l, ref_w, ref_l = (0.05 + 0.01 * torch.randn(16, generator=g) for _ in range(4))
    for beta, lw, ll in ((0.05, 0.35, 0.15), (0.1, 0.5, 0.0)):
        s = DPOSettings(loss="hinge", beta=beta, lambda_win=lw, lambda_lose=ll, anchors_in_reward_units=reward_units)
        new = dpo_loss(err_w, err_l, ref_w, ref_l, s)[0]
        old = old_stabilized_loss(err_w, err_l, ref_w, ref_l, beta * 1000, lw, ll, reward_units)
        assert torch.equal(new, old)


def test_plain_is_the_old_loss_with_lambdas_zero():
    err_w, err_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.12, 0.20]), torch.tensor([0.29, 0.15])
    plain = dpo_loss(err_w, err_l, ref_w, ref_l, DPOSettings(loss="plain"))[0]  # the lambdas are ignored
    assert torch.equal(plain, old_stabilized_loss(err_w, err_l, ref_w, ref_l, lambda_win=0.0, lambda_lose=0.0))


@pytest.mark.parametrize("reward_units", [True, False])
def test_loss_matches_hand_computation(reward_units):
    s = DPOSettings(loss="hinge", beta=0.05, beta_scale=1000.0, lambda_win=0.35, lambda_lose=0.15,
                    anchors_in_reward_units=reward_units)
    err_w, err_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.12, 0.20]), torch.tensor([0.29, 0.15])
    loss, stats = dpo_loss(err_w, err_l, ref_w, ref_l, s)
    expected = []
    for ew, el, rw, rl in zip(err_w.tolist(), err_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        margin = -50.0 * ((ew - rw) - (el - rl))
        anchor_w, anchor_l = (50 * (ew - rw), 50 * max(0.0, el - rl)) if reward_units else (ew, max(0.0, el - rl))
        expected.append(math.log1p(math.exp(-margin)) + 0.35 * anchor_w + 0.15 * anchor_l)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert stats["reward_acc"].item() == 0.5  # pair 0: margin +1.5, pair 1: margin -2.5
    assert stats["reward_margin"].item() == pytest.approx((1.5 - 2.5) / 2, rel=1e-5)


def test_reward_unit_anchors_have_the_gradients_of_the_raw_form_times_beta():
    s = DPOSettings(loss="hinge")
    grads = []
    for reward_units in (True, False):
        err_w, err_l = torch.tensor([0.10], requires_grad=True), torch.tensor([0.35], requires_grad=True)
        loss, _ = dpo_loss(err_w, err_l, torch.tensor([0.12]), torch.tensor([0.30]),
                           s.replace(anchors_in_reward_units=reward_units))
        loss.backward()
        grads.append((err_w.grad.item(), err_l.grad.item()))
    sig = torch.sigmoid(torch.tensor(-3.5)).item()  # sigmoid(-margin), margin = -50 * (-0.02 - 0.05)
    assert grads[0] == pytest.approx((50 * (sig + 0.35), 50 * (-sig + 0.15)), rel=1e-5)
    assert grads[1] == pytest.approx((50 * sig + 0.35, -50 * sig + 0.15), rel=1e-5)


def test_policy_equal_to_reference_gives_log2_and_real_gradients(tmp_path, tiny_pipeline_dir):
    trainer = built(DPOTrainer(dpo_config(tmp_path, tiny_pipeline_dir, write_pair_set(tmp_path / "pairs"))))
    batch = {k: ([v[k] for v in map(trainer.dataset.__getitem__, range(3))]) for k in ("caption", "chosen", "rejected")}
    batch = {k: v if k == "caption" else torch.stack(v) for k, v in batch.items()}
    inputs = trainer.prepare_batch(batch, torch.Generator().manual_seed(0))
    loss, stats = trainer.loss(trainer.model, inputs, 0)  # the loss and the statistics the engine logs
    assert stats["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["delta_w"] == 0 and stats["delta_l"] == 0
    # "report" (the default) adds the policy's errors, which here are the reference's
    assert loss.item() == pytest.approx(math.log(2) + 0.35 * stats["err_w"] + 0.15 * stats["err_l"], rel=1e-5)
    with torch.no_grad():
        err, ref = trainer.pair_errors(trainer.model, inputs)
    hinge, _ = dpo_loss(err[:3], err[3:], ref[:3], ref[3:], DPOSettings(loss="hinge"))
    assert hinge.item() == pytest.approx(math.log(2), abs=1e-6)  # the hinge's anchors are zero at the reference
    assert trainer.compute_loss(trainer.model, inputs, 0).item() == loss.item()
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert all(not p.requires_grad for p in trainer.reference.parameters())


@pytest.mark.parametrize("lambdas", [(0.35, 0.15), (0.0, 0.0)])
def test_training_lowers_the_loss_reference_stays(tmp_path, tiny_pipeline_dir, lambdas):
    pairs = write_pair_set(tmp_path / "pairs", n=4)
    dpo = DPOSettings(pairs=str(pairs), lambda_win=lambdas[0], lambda_lose=lambdas[1])
    cfg = dpo_config(tmp_path, tiny_pipeline_dir, pairs, dpo=dpo, steps=20, batch_size=4, lr=2e-3, log_every=4,
                     save_every=1000, ema_decay=0.0)
    trainer = DPOTrainer(cfg)
    before = load_file(str(tiny_pipeline_dir / "transformer" / "model.safetensors"))  # init_from's weights
    trainer.train()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.05, logged
    if lambdas == (0.0, 0.0):  # plain DPO: the loss is the DPO term; the implicit reward must separate the pairs
        assert logged[-1]["reward_margin"] > 0.1 and logged[-1]["reward_acc"] >= 0.75, logged
    else:  # the random tiny model mostly learns the chosen images: the SFT anchor dominates
        assert logged[-1]["delta_w"] < 0, logged
    assert all(torch.equal(before[k], v) for k, v in trainer.reference.state_dict().items())
    assert TextToImagePipeline.from_pretrained(tmp_path / "run" / "pipeline").config.steps == 4


def test_resume_is_exact(tmp_path, tiny_pipeline_dir):
    """Through the engine: 4 steps straight == 2 steps, then a resumed run to 4 (weights, EMA, Adam state, logs)."""
    pairs = write_pair_set(tmp_path / "pairs")
    DPOTrainer(dpo_config(tmp_path / "a", tiny_pipeline_dir, pairs)).train()
    first = DPOTrainer(dpo_config(tmp_path / "b", tiny_pipeline_dir, pairs, steps=2)).train()
    assert first["step"] == 2
    DPOTrainer(dpo_config(tmp_path / "b", tiny_pipeline_dir, pairs)).train()  # resumes at step 2
    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "run"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "run"))
    assert a["step"] == b["step"] == 4 and set(a["modules"]) == {"model", "ema"}
    for name in ("model", "ema"):
        assert all(torch.equal(a["modules"][name][k], b["modules"][name][k]) for k in a["modules"][name])
    assert_same_optimizer_state(a["states"]["optimizer"], b["states"]["optimizer"])
    records = [json.loads(l) for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    straight = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_margin"] for r in straight if "loss" in r] == [r["reward_margin"] for r in logged]


def test_time_limited_run_exports_nothing_and_says_so(tmp_path, tiny_pipeline_dir):
    pairs = write_pair_set(tmp_path / "pairs")
    cfg = dpo_config(tmp_path, tiny_pipeline_dir, pairs, max_minutes=1e-6, save_every=100)
    cfg.save(tmp_path / "dpo.json")
    res = runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json")])
    assert res.exit_code == 0, res.output
    assert "stopped: time limit" in res.output and "nothing exported" in res.output
    assert not (tmp_path / "run" / "pipeline").exists()
    assert latest_checkpoint(tmp_path / "run").name == "step-0000001"  # saved where it stopped: resumable
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["done"] is False and "time limit" in last["stopped"]


# ---- the pair file -------------------------------------------------------------------------------
def test_pair_file_round_trip_and_metadata(tmp_path):
    ds = PreferencePairs(write_pair_set(tmp_path), image_size=32)
    item = ds[0]
    assert item["chosen"].shape == (3, 32, 32) and item["rejected"].min() >= -1
    assert ds.pairs[2].metadata == {"id": 2}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a red circle", "chosen": "img/0_w.png"}', "pairs.jsonl:2: missing key(s) ['rejected']"),
    ('{"prompt": "a red circle", "chosen": "img/0_w.png", "rejected": "nope.png"}',
     "pairs.jsonl:2: rejected image not found"),
    ('{"prompt": "a red circle", "chosen": "big.png", "rejected": "img/0_l.png"}', "pairs.jsonl:2: chosen image"),
    ('{"prompt": 3, "chosen": "img/0_w.png", "rejected": "img/0_l.png"}', "pairs.jsonl:2: ['prompt'] must be"),
    ('{"prompt": "x", "chosen": "img/0_w.png",', "pairs.jsonl:2: not valid JSON"),
    ('["prompt"]', "pairs.jsonl:2: expected a JSON object"),
])
def test_bad_pair_file_names_the_line(tmp_path, line, message):
    path = write_pair_set(tmp_path, n=1)
    Image.new("RGB", (48, 32)).save(tmp_path / "big.png")
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        PreferencePairs(path, image_size=32)
    assert message in str(err.value)
    if "big.png" in line:
        assert "48x32, expected 32x32" in str(err.value)


def test_empty_or_missing_pair_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")


# ---- judges and the pair maker ---------------------------------------------------------------------
def test_alignment_judge_prefers_the_true_render():
    world = ShapesWorld(100, image_size=32, seed=0, kinds={"relation": 1.0})
    scene, text = world.scene(0)
    other, _ = world.scene(1)
    good, bad = AlignmentJudge()([text, text], np.stack([render(scene), render(other)]))
    assert good[0] == 1 and good > bad
    assert best_and_worst([bad, good, good]) == (1, 0) and best_and_worst([good, good]) is None


def test_load_judge():
    assert isinstance(load_judge("alignment"), AlignmentJudge)
    assert load_judge("test_dpo:brightness_judge") is brightness_judge
    with pytest.raises(ValueError, match="unknown judge"):
        load_judge("sharpness")


def test_pair_maker_writes_a_loadable_reproducible_file(tmp_path, tiny_pipeline_dir):
    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    prompts = ["a red circle", "two blue squares", "a green triangle above a red square"]
    summary = make_pairs(pipe, prompts, tmp_path / "pairs", brightness_judge, candidates=3, seed=5,
                         prompts_per_batch=2, num_inference_steps=2, progress=False)
    assert summary["pairs"] == 3 and summary["all_tied"] == 0
    ds = PreferencePairs(tmp_path / "pairs" / "pairs.jsonl", image_size=32)
    pair = ds.pairs[2]
    assert pair.prompt == prompts[2] and pair.metadata["chosen_score"] > pair.metadata["rejected_score"]
    again = pipe(prompts[2], seed=pair.metadata["chosen_seed"], num_inference_steps=2, output_type="np").images[0]
    assert np.array_equal(np.asarray(Image.open(pair.chosen)), again)
    assert 6 <= pair.metadata["chosen_seed"] - 5 < 9  # candidate seeds of prompt 2: seed + 2*3 + c


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_make_pairs_and_train(tmp_path, tiny_pipeline_dir):
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    res = runner.invoke(app, ["dpo", "make-pairs", "--out", str(tmp_path / "p"), "--model", str(tiny_pipeline_dir),
                              "--prompts", str(tmp_path / "prompts.txt"), "-k", "2", "--steps", "2",
                              "--judge", "test_dpo:brightness_judge"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["pairs"] == 2
    cfg = dpo_config(tmp_path, tiny_pipeline_dir, tmp_path / "p" / "pairs.jsonl", steps=1, batch_size=2)
    cfg.save(tmp_path / "dpo.json")
    res = runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json"), "--set", "dpo.beta=0.1"])
    assert res.exit_code == 0, res.output
    saved = DPOTrainConfig.load(tmp_path / "run" / "train_config.json")
    assert saved.dpo.beta == 0.1 and saved.model.num_layers == 2  # model config taken from init_from


def assert_clean_error(res, fragment):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.output


def test_cli_errors(tmp_path, tiny_pipeline_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n')
    cfg = dpo_config(tmp_path, tiny_pipeline_dir, bad)
    cfg.save(tmp_path / "dpo.json")
    assert_clean_error(runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json")]), "bad.jsonl:1: missing key")
    (tmp_path / "noinit.json").write_text(json.dumps({**cfg.to_dict(), "init_from": ""}))
    assert_clean_error(runner.invoke(app, ["dpo", "train", str(tmp_path / "noinit.json")]), "needs init_from")
    assert_clean_error(runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json"), "--set", "dpo.beta=-1"]),
                       "dpo.beta: must be > 0")
    assert_clean_error(runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json"), "--set", "steps=two"]),
                       "steps: expected int")
    assert_clean_error(runner.invoke(app, ["dpo", "train", str(tmp_path / "dpo.json"), "--set",
                                           f"init_from={tmp_path / 'nowhere'}"]), "nowhere")
    assert not (tmp_path / "run").exists()  # every refusal came before anything was written
    assert_clean_error(runner.invoke(app, ["dpo", "make-pairs", "--out", str(tmp_path / "x"), "--kinds", "spirals"]),
                       "--kinds")


def test_every_dpo_config_loads():
    files = sorted((REPO / "configs" / "dpo").glob("*.json"))
    assert {f.name for f in files} >= {"shapes.json", "tiny.json"}
    for f in files:
        cfg = DPOTrainConfig.load(f)
        assert cfg.init_from and cfg.dpo.pairs, f
        assert "loss" in json.loads(f.read_text())["dpo"], f"{f.name} must state its loss"
    assert DPOTrainConfig.load(REPO / "configs" / "dpo" / "shapes.json").dpo.loss == "hinge"  # its documented runs


def test_config_rules():
    with pytest.raises(ConfigError, match="needs dpo.pairs"):
        DPOTrainConfig.from_dict({"init_from": "default"})
    with pytest.raises(ConfigError, match="dpo.lambda_win: must be >= 0"):
        DPOTrainConfig.from_dict({"init_from": "default", "dpo": {"pairs": "p.jsonl", "lambda_win": -0.1}})
    with pytest.raises(ConfigError, match="steps: must be >= 1"):
        DPOTrainConfig.from_dict({"init_from": "default", "dpo": {"pairs": "p.jsonl"}, "steps": 0})


def test_cli_train_from_the_shipped_config(tmp_path):
    """`ernielab dpo train configs/dpo/tiny.json` (the bundled model), shortened with --set, into --output-dir."""
    pairs = write_pair_set(tmp_path / "pairs", n=4)
    res = runner.invoke(app, ["dpo", "train", str(REPO / "configs" / "dpo" / "tiny.json"), "--set", "steps=2",
                              "--set", "batch_size=2", "--set", f"dpo.pairs={pairs}", "--set", "log_every=1",
                              "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output and str(tmp_path / "out" / "pipeline") in res.output
    saved = DPOTrainConfig.load(tmp_path / "out" / "train_config.json")
    assert saved.steps == 2 and saved.output_dir == str(tmp_path / "out") and saved.model.num_layers == 6
    logged = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [r["step"] for r in logged] == [1, 2] and all("reward_acc" in r for r in logged)
    assert TextToImagePipeline.from_pretrained(tmp_path / "out" / "pipeline").config.steps == 50


def test_aesthetic_judge_from_a_saved_scorer(tmp_path):
    from ernielab.aesthetic.scorer import AestheticConfig, AestheticScorer

    torch.manual_seed(0)
    scorer = AestheticScorer(AestheticConfig(backbone="pixels:2", feature_dim=12, hidden=0, dropout=0.0))
    scorer.save_pretrained(tmp_path / "scorer")
    judge = load_judge(f"aesthetic:{tmp_path / 'scorer'}")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    scores = judge(["a red circle"] * 3, images)
    assert len(scores) == 3 and scores == scorer.score(list(images)).tolist()
    with pytest.raises(FileNotFoundError):
        load_judge(f"aesthetic:{tmp_path / 'nowhere'}")
