"""Aesthetic scorer: Bradley-Terry loss, Swiss tournament, ERIA-1K layout, scorer I/O, training, backbones."""
import json
import math
import shutil

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
    scorer, report = train_from_benchmark(cfg, progress=False)
    assert report["val_pair_accuracy"] > 0.6
    test = evaluate_benchmark(load_scorer(tmp_path / "scorer"), easy_benchmark, progress=False)
    assert test["srcc"] > 0.5 and test["n"] == 60
    assert test["mean_score_per_tier"][10] > test["mean_score_per_tier"][1]


def test_training_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    features = torch.randn(40, 6)
    order = features[:, 0].argsort(descending=True)
    pairs = torch.stack([order[:-1], order[1:]], 1)
    cfg = AestheticTrainConfig(output_dir=str(tmp_path), backbone="pixels:1", hidden=4, steps=40, batch_size=8,
                               save_every=20, log_every=10)
    full, _ = train_head(features, pairs, cfg, progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000040")
    resumed, _ = train_head(features, pairs, cfg, progress=False)
    for a, b in zip(full.head.state_dict().values(), resumed.head.state_dict().values()):
        assert torch.equal(a, b)


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
