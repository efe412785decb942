"""The CLI end to end on a tiny pipeline: outputs, and one clear error line + non-zero exit on bad input."""
import json

from PIL import Image
from typer.testing import CliRunner

from ernielab.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_single_and_prompt_file(tiny_pipeline_dir, tmp_path):
    res = run("generate", "a red circle", "-o", tmp_path / "one.png", "--model", tiny_pipeline_dir, "--steps", 2)
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "one.png").size == (32, 32)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a red square\n")
    res = run("generate", "--prompts", prompts, "--out", tmp_path / "out", "--seed", 3, "--model",
              tiny_pipeline_dir, "--steps", 2)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png"]
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())["seed"] == 3
    # line i with seed 3 is the single-prompt image with seed 3 + i
    res = run("generate", "two blue squares", "-o", tmp_path / "again.png", "--seed", 4, "--model",
              tiny_pipeline_dir, "--steps", 2)
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "out" / "0001.png").tobytes()


def assert_clean_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs(tiny_pipeline_dir, tmp_path):
    assert_clean_error(run("generate", "x", "--model", tmp_path / "missing"), "pipeline.json")
    assert_clean_error(run("generate", "--prompts", tmp_path / "nope.txt", "--model", tiny_pipeline_dir),
                       "prompt file not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_clean_error(run("generate", "--prompts", tmp_path / "empty.txt", "--model", tiny_pipeline_dir),
                       "no prompts")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert_clean_error(run("generate", "--prompts", tmp_path / "bin.txt", "--model", tiny_pipeline_dir),
                       "cannot read prompt file")
    assert_clean_error(run("generate", "a red circle", "--size", "30", "--model", tiny_pipeline_dir,
                           "-o", tmp_path / "x.png"), "multiple of 4")
    assert not (tmp_path / "x.png").exists()
    assert_clean_error(run("generate", "a", "--size", "big", "--model", tiny_pipeline_dir), "--size")
    assert_clean_error(run("generate", "--model", tiny_pipeline_dir), "exactly one of")
    assert_clean_error(run("image", "train", tmp_path / "none.json"), "config file not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert_clean_error(run("image", "train", tmp_path / "bad.json"), "not valid JSON")
    (tmp_path / "typo.json").write_text(json.dumps({"stepz": 3}))
    assert_clean_error(run("image", "train", tmp_path / "typo.json"), "unknown config keys")


def test_train_cli_with_overrides(tmp_path):
    cfg = {"model": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 1, "ffn_hidden_size": 64,
                     "in_channels": 48, "out_channels": 48, "text_in_dim": 384, "rope_axes_dim": [4, 6, 6]},
           "steps": 100, "batch_size": 2, "log_every": 1, "save_every": 2}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = run("image", "train", tmp_path / "c.json", "--set", "steps=2", "--output-dir", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "pipeline" / "pipeline.json").is_file()


def test_every_shipped_config_loads():
    from pathlib import Path

    from ernielab.core.cli import load_config
    from ernielab.image.train import TrainConfig

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "image").glob("*.json"))
    assert len(configs) >= 4
    for path in configs:
        load_config(TrainConfig, path)


def test_eval_paraphrase_and_compositional(tiny_pipeline_dir, tmp_path):
    """`image eval --n-paraphrase N --holdout ...`: template vs held-out-wording twins per kind, and held-out vs
    seen combinations, in eval.json and the printed summary."""
    res = run("image", "eval", "--model", tiny_pipeline_dir, "--n-fid", 0, "--n-align", 1, "--n-paraphrase", 1,
              "--holdout", "red triangle left of", "--steps", 1, "--out", tmp_path / "eval")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report["paraphrase"]) == {"single", "count", "relation"}
    assert all({"template", "paraphrase"} <= set(v) for v in report["paraphrase"].values())
    assert report["compositional"]["holdout_combinations"] == ["red triangle left of"]
    assert {"heldout", "seen"} <= set(report["compositional"])
    assert report["data"]["holdout_combinations"] == ["red triangle left of"]
