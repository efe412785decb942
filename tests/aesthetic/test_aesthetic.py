"""Aesthetic scorer: Bradley-Terry loss, Swiss tournament, ERIA-1K layout, scorer I/O, training, backbones."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from ernielab.aesthetic.scorer import (
    DEFAULT_SCORER,
    QUALITY_CUES,
    AestheticConfig,
    AestheticScorer,
    build_backbone,
    correlations,
    load_scorer,
)
from ernielab.aesthetic.tiered import (
    TieredBenchmarkConfig,
    build_benchmark,
    degrade,
    noisy_judge,
    read_tiered,
    swiss_tournament,
    write_split,
)
from ernielab.aesthetic.train import AestheticTrainConfig, bradley_terry_loss, train_from_benchmark, train_head
from ernielab.worlds.shapes import ShapesWorld, render

REPO = Path(__file__).resolve().parents[2]

def shapes_images(n: int, size: int = 32) -> np.ndarray:
    ds = ShapesWorld(n, size, split="test")
    return np.stack([render(ds.scene(i)[0]) for i in range(n)])


def test_bradley_terry_loss_by_hand():
    winners, losers = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(2) and -log sigmoid(-1), averaged
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(winners, losers).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_noiseless_tournament_ranks_perfectly():
    rng = np.random.default_rng(0)
    quality = rng.normal(size=50)
    result = swiss_tournament(50, noisy_judge(quality, 0.0, rng), swiss_rounds=5, refine_rounds=50, rng=rng)
    assert spearmanr(-result.ranks(), quality).statistic == pytest.approx(1.0)
    assert np.bincount(result.tiers())[1:].tolist() == [5] * 10  # deciles, tier 10 = best
    assert result.tiers()[np.argmax(quality)] == 10
    # A noisy judge (and no refinement) does not rank perfectly, but still well.
    noisy = swiss_tournament(50, noisy_judge(quality, 0.5, rng), swiss_rounds=5, refine_rounds=0, rng=rng)
    assert 0.5 < spearmanr(-noisy.ranks(), quality).statistic < 1.0


def test_eria_layout_round_trip(tmp_path):
    images = shapes_images(4, 16)
    names = write_split(tmp_path, "test", images, np.array([1, 10, 5, 5]))
    for location in (tmp_path, tmp_path / "test", tmp_path / "test" / "test.json"):
        items = read_tiered(location)
        assert [it.tier for it in items] == [1, 10, 5, 5]
        assert [it.path.name for it in items] == names
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(items[1].path)), images[1])
    (tmp_path / "test" / "test.json").write_text(json.dumps({names[0]: 3, names[2]: 7}))  # mapping form
    assert [it.tier for it in read_tiered(tmp_path)] == [3, 7]


@pytest.mark.parametrize("entries, match", [
    ([{"image": "000001.png", "tier": 11}], r"entry 0 \('000001.png'\) has tier 11, outside 1..10"),
    ([{"image": "000001.png", "tier": 2.5}], r"entry 0 \('000001.png'\) has tier 2.5"),
    ([{"image": "000001.png", "tier": 2}, {"image": "gone.png", "tier": 3}], r"entry 1 \('gone.png'\) .*missing image"),
    ([{"image": "000001.png"}], r"entry 0 \('000001.png'\) has no tier"),
    ([{"tier": 4}], r"entry 0 has no image path"),
])
def test_bad_test_json_names_the_entry(tmp_path, entries, match):
    write_split(tmp_path, "test", shapes_images(1, 16), np.array([1]))
    (tmp_path / "test" / "test.json").write_text(json.dumps(entries))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_tiered(tmp_path)


def test_missing_or_broken_test_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test.json"):
        read_tiered(tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_tiered(tmp_path)


def test_cli_bad_benchmark_is_one_error_line(tmp_path):
    from ernielab.cli.main import app

    model = AestheticScorer(AestheticConfig(backbone="pixels:4", feature_dim=48, hidden=0)).save_pretrained(tmp_path / "m")
    write_split(tmp_path / "bench", "test", shapes_images(1, 16), np.array([1]))
    (tmp_path / "bench" / "test" / "test.json").write_text(json.dumps([{"image": "000001.png", "tier": 0}]))
    result = CliRunner().invoke(app, ["aesthetic", "eval", str(tmp_path / "bench"), "--model", str(model)])
    assert result.exit_code == 2
    assert "error:" in result.output and "entry 0" in result.output and "outside 1..10" in result.output
    image = tmp_path / "bench" / "test" / "000001.png"
    result = CliRunner().invoke(app, ["aesthetic", "score", str(image), "--model", str(model)])
    assert result.exit_code == 0 and result.output.strip().endswith(str(image))
    result = CliRunner().invoke(app, ["aesthetic", "score", str(tmp_path / "nope.png"), "--model", str(model)])
    assert result.exit_code == 2 and "error: image not found" in result.output


def test_scorer_save_load(tmp_path):
    torch.manual_seed(0)
    scorer = AestheticScorer(AestheticConfig(backbone="pixels:4", feature_dim=48, hidden=16, score_scale=2.0))
    scorer.head.set_normalization(torch.rand(10, 48))
    images = torch.from_numpy(shapes_images(3)).permute(0, 3, 1, 2)
    scorer.save_pretrained(tmp_path / "s")
    loaded = load_scorer(tmp_path / "s")
    assert loaded.config == scorer.config
    assert torch.equal(loaded.score(images), scorer.eval().score(images))
    assert torch.allclose(scorer.score(images.float() / 127.5 - 1), scorer.score(images), atol=1e-6)  # float input
    with pytest.raises(FileNotFoundError, match="not an aesthetic scorer folder"):
        load_scorer(tmp_path)
    wrong = AestheticScorer(AestheticConfig(backbone="pixels:4", feature_dim=48, hidden=8))
    wrong.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text((tmp_path / "s" / "config.json").read_text())
    with pytest.raises(ValueError, match="does not fit"):
        load_scorer(tmp_path / "w")


@pytest.fixture(scope="module")
def easy_benchmark(tmp_path_factory):
    """Colour-only degradations, which 4x4 pooled pixels can see."""
    root = tmp_path_factory.mktemp("bench")
    cfg = TieredBenchmarkConfig(n_train=150, n_test=60, image_size=16, kinds=("desaturate", "contrast", "color_cast"),
                                active_prob=0.6, swiss_rounds=6, refine_rounds=4, judge_noise=0.05)
    build_benchmark(root, cfg, progress=False)
    return root


def test_training_beats_chance_on_easy_split(easy_benchmark, tmp_path):
    from ernielab.aesthetic.train import evaluate_benchmark

    cfg = AestheticTrainConfig(benchmark=str(easy_benchmark), output_dir=str(tmp_path), backbone="pixels:4",
                               hidden=32, steps=200, batch_size=128, lr=3e-3)
    result = train_from_benchmark(cfg, progress=False)
    report = result["report"]
    assert report["val_pair_accuracy"] > 0.6 and report["steps"] == 200
    assert json.loads((tmp_path / "train_report.json").read_text()) == report
    assert result["exported"] == str(tmp_path / "scorer") and result["scorer"].config.score_scale != 1.0  # calibrated
    test = evaluate_benchmark(load_scorer(tmp_path / "scorer"), easy_benchmark, progress=False)
    assert test["srcc"] > 0.5 and test["n"] == 60
    assert test["mean_score_per_tier"][10] > test["mean_score_per_tier"][1]
    cache = list((tmp_path / "features").iterdir())  # features cached as safetensors only, no pickle anywhere
    assert [p.suffix for p in cache] == [".safetensors"]
    written = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {".safetensors", ".json", ".jsonl", ""}, written


def _ranked_pairs():
    torch.manual_seed(0)
    features = torch.randn(40, 6)
    order = features[:, 0].argsort(descending=True)
    return features, torch.stack([order[:-1], order[1:]], 1)


def _head_config(out, **kw) -> AestheticTrainConfig:
    return AestheticTrainConfig(**{**dict(output_dir=str(out), backbone="pixels:1", hidden=4, steps=40, batch_size=8,
                                          save_every=20, log_every=10), **kw})


def test_training_resumes_exactly(tmp_path):
    """40 steps straight vs 20 + resume through the engine: identical weights and optimizer state."""
    from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint

    features, pairs = _ranked_pairs()
    full, result = train_head(features, pairs, _head_config(tmp_path))
    assert result["step"] == 40 and result["exported"] == str(tmp_path / "scorer")
    straight = load_checkpoint(latest_checkpoint(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000040")  # back to step 20, as if the run had stopped there
    resumed, again = train_head(features, pairs, _head_config(tmp_path))
    assert again["step"] == 40
    for a, b in zip(full.head.state_dict().values(), resumed.head.state_dict().values()):
        assert torch.equal(a, b)
    split = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.equal(straight["modules"]["model"][k], v) for k, v in split["modules"]["model"].items())
    opt_a, opt_b = straight["states"]["optimizer"], split["states"]["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in state.items())
    assert straight["states"]["scheduler"] == split["states"]["scheduler"]


def test_engine_port_matches_the_hand_written_loop(tmp_path):
    """The pair batch of step t is a function of (seed, t) and dropout is seeded per step, as before the port:
    a hand-rolled replica of the old loop (AdamW, cosine warm-up, no clipping) gives bit-identical weights."""
    from ernielab.aesthetic.scorer import AestheticConfig
    from ernielab.core.schedules import lr_factor
    from ernielab.core.seeding import derive_seed, generator

    features, pairs = _ranked_pairs()
    cfg = _head_config(tmp_path, steps=12, dropout=0.3)
    engine_scorer, _ = train_head(features, pairs, cfg)
    torch.manual_seed(derive_seed(cfg.seed, "aesthetic-init"))
    scorer = AestheticScorer(AestheticConfig(backbone=cfg.backbone, feature_dim=6, hidden=cfg.hidden, dropout=cfg.dropout))
    scorer.head.set_normalization(features)
    opt = torch.optim.AdamW(scorer.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps))
    scorer.head.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=generator(cfg.seed, "aesthetic", step))
        torch.manual_seed(derive_seed(cfg.seed, "aesthetic-dropout", step))
        scores = scorer.head(features[pairs[idx].flatten()]).view(-1, 2)
        opt.zero_grad()
        bradley_terry_loss(scores[:, 0], scores[:, 1]).backward()
        opt.step()
        sched.step()
    for k, v in scorer.head.state_dict().items():
        assert torch.equal(v, engine_scorer.head.state_dict()[k]), k


def test_time_limited_run_exports_nothing(easy_benchmark, tmp_path):
    cfg = AestheticTrainConfig(benchmark=str(easy_benchmark), output_dir=str(tmp_path), backbone="pixels:2",
                               hidden=0, steps=50, batch_size=16, max_minutes=1e-9)
    result = train_from_benchmark(cfg, progress=False)
    assert result["stopped"].startswith("time limit") and result["exported"] is None and result["step"] == 1
    assert not (tmp_path / "scorer").exists() and not (tmp_path / "train_report.json").exists()
    assert (tmp_path / "checkpoints" / "step-0000001").is_dir()
    done = train_from_benchmark(cfg.replace(max_minutes=0.0), progress=False)  # the same run, resumed
    assert done["step"] == 50 and (tmp_path / "scorer" / "model.safetensors").is_file()


def test_bad_training_input_fails_before_writing(easy_benchmark, tmp_path):
    from ernielab.core.config import ConfigError

    for bad, match in [({"hidden": -1}, "hidden: must be >= 0"), ({"steps": "many"}, "steps: expected int"),
                       ({"backbone": "resnet"}, "backbone must be"), ({"val_fraction": 1.0}, "val_fraction")]:
        with pytest.raises(ConfigError, match=match):
            AestheticTrainConfig.from_dict({"benchmark": str(easy_benchmark), **bad})
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="set benchmark"):
        train_from_benchmark(AestheticTrainConfig(output_dir=str(out)), progress=False)
    with pytest.raises(FileNotFoundError):
        train_from_benchmark(AestheticTrainConfig(benchmark=str(tmp_path / "nope"), output_dir=str(out)), progress=False)
    assert not out.exists()
    cfg = AestheticTrainConfig(benchmark=str(easy_benchmark), output_dir=str(out), backbone="pixels:2", hidden=0,
                               steps=2, batch_size=8)
    train_from_benchmark(cfg, progress=False)
    cached = sorted(p.name for p in (out / "features").iterdir())
    with pytest.raises(ValueError, match=r"other settings \(backbone, hidden\)"):  # another model in the run
        train_from_benchmark(cfg.replace(backbone="pixels:3", hidden=4), progress=False)
    assert sorted(p.name for p in (out / "features").iterdir()) == cached  # refused before extracting features


def test_every_config_loads():
    configs = sorted((REPO / "configs" / "aesthetic").glob("*.json"))
    assert {p.stem for p in configs} >= {"default", "inception_linear", "pixels8_mlp"}
    for path in configs:
        cfg = AestheticTrainConfig.load(path)
        assert cfg.benchmark and cfg.output_dir.startswith("runs/aesthetic/")
    default = AestheticTrainConfig.load(REPO / "configs" / "aesthetic" / "default.json")
    assert (default.backbone, default.hidden, default.steps, default.batch_size, default.lr) == ("inception", 128, 1500,
                                                                                                256, 1e-3)


def test_train_cli(easy_benchmark, tmp_path):
    from ernielab.cli.main import app

    config = str(REPO / "configs" / "aesthetic" / "default.json")
    sets = [a for s in ("backbone=pixels:2", f"benchmark={easy_benchmark}", "batch_size=16",
                        f"feature_cache={tmp_path / 'features'}") for a in ("--set", s)]
    result = CliRunner().invoke(app, ["aesthetic", "train", config, *sets, "--set", "steps=2",
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output and (tmp_path / "run" / "scorer" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["backbone"] == "pixels:2"
    result = CliRunner().invoke(app, ["aesthetic", "train", config, *sets, "--set", "steps=3", "--set",
                                      "max_minutes=1e-9", "--output-dir", str(tmp_path / "timed")])
    assert result.exit_code == 0, result.output
    assert "nothing exported" in result.output and not (tmp_path / "timed" / "scorer").exists()
    result = CliRunner().invoke(app, ["aesthetic", "train", config, *sets, "--set", "hidden=-2",
                                      "--output-dir", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "error:" in result.output and "hidden" in result.output
    assert not (tmp_path / "bad").exists()
    assert [p.suffix for p in (tmp_path / "features").iterdir()] == [".safetensors"]


def test_benchmark_cli_checks_its_config_first(tmp_path):
    from ernielab.cli.main import app

    result = CliRunner().invoke(app, ["aesthetic", "benchmark", str(tmp_path / "b"), "--n-train", "1"])
    assert result.exit_code == 2 and "n_train: must be >= 2" in result.output and not (tmp_path / "b").exists()
    result = CliRunner().invoke(app, ["aesthetic", "benchmark", str(tmp_path / "b"), "--n-train", "12", "--n-test",
                                      "10", "--image-size", "16", "--set", "swiss_rounds=2", "--set", "refine_rounds=0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert summary["config"]["n_train"] == 12 and summary["config"]["judge_noise"] == 0.2  # the config's default


def test_quality_cues_react_to_degradations():
    images = shapes_images(4)
    rng = np.random.default_rng(0)
    batch = lambda sev: torch.from_numpy(np.stack([degrade(im, sev, rng) for im in images])).permute(0, 3, 1, 2)
    clean = batch({})
    sharp, _ = QUALITY_CUES["laplacian_variance"]
    colour, _ = QUALITY_CUES["colourfulness"]
    noise, _ = QUALITY_CUES["noise_energy"]
    assert (sharp(batch({"blur": 1.0})) < sharp(clean)).all()
    assert (colour(batch({"desaturate": 1.0})) < colour(clean)).all()
    assert (noise(batch({"noise": 0.5})) > noise(clean)).all()
    assert correlations([1, 2, 3, 4], [1, 2, 4, 3])["srcc"] == pytest.approx(0.8)


def test_inception_backbone_scores_two_images():
    images = shapes_images(2)
    wrecked = degrade(images[0], {"noise": 0.8, "blur": 0.8}, np.random.default_rng(0))
    scorer = AestheticScorer(AestheticConfig(backbone="inception", feature_dim=2048, hidden=8))
    features = scorer.features([images[0], images[1], wrecked])  # the FID Inception's pool3 features
    assert features.shape == (3, 2048) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    scores = scorer.score_features(features[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    if (DEFAULT_SCORER / "config.json").is_file():  # the shipped head prefers a clean render to a wrecked one
        shipped = load_scorer().score_features(features[[0, 2]])
        assert shipped[0] > shipped[1]


def test_transformers_backbone(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    backbone = build_backbone(f"hf:{tmp_path}")
    features = backbone(torch.from_numpy(shapes_images(2, 16)).permute(0, 3, 1, 2))
    assert backbone.dim == 16 and features.shape == (2, 16) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet")
