"""`ernielab generate --model` with a release folder, and its bad inputs as one clean error line."""
import shutil

import huggingface_hub.constants as hf_constants
from PIL import Image
from test_cli import assert_clean_error, run  # tests/image/test_cli.py: the CLI runner and its one-line check


def test_generate_from_release_folder(tiny_release_dir, tmp_path):
    res = run("generate", "a red circle", "-o", tmp_path / "one.png", "--model", tiny_release_dir, "--steps", 2,
              "--size", "64x96")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "one.png").size == (96, 64)
    assert "revised prompt" not in res.output  # the enhancer stays off unless asked for


def test_release_bad_inputs(tiny_release_dir, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_release_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    assert_clean_error(run("generate", "x", "--model", broken, "--steps", 1), "text_encoder", "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert_clean_error(run("generate", "x", "--model", "nobody/not-cached-anywhere"), "nobody/not-cached-anywhere",
                       "HF_HUB_OFFLINE")
