"""`ernielab unified` end to end on tiny settings: vq, train (configs/unified/*.json, --set, exact resume after a
time limit), generate-image, caption, extract-submodel, eval, and clear errors on bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.unified.cli import app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "unified"
TINY = CONFIGS / "tiny.json"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(output: str) -> dict:
    line = output.strip().splitlines()[-1]
    return json.loads(line[line.index("{"):])  # a progress bar may share the line


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    res = invoke("vq", CONFIGS / "vq_tiny.json", "--output-dir", root / "vq")
    assert res.exit_code == 0, res.output
    assert set(last_json(res.output)) >= {"psnr", "codes_used", "align_reconstruction"}
    assert (root / "vq" / "vq.safetensors").is_file() and (root / "vq" / "vq_config.json").is_file()
    res = invoke("train", TINY, "--set", f"vq_dir={root / 'vq'}", "--output-dir", root / "run")
    assert res.exit_code == 0 and f"exported to {root / 'run' / 'model'}" in res.output, res.output
    return root


def train(trained, run, *sets):
    return invoke("train", TINY, "--set", f"vq_dir={trained / 'vq'}", "--output-dir", run,
                  *[a for s in sets for a in ("--set", s)])


def test_train_cli_with_overrides(trained, tmp_path):
    res = train(trained, tmp_path / "short", "steps=2", "model.elastic.coupled=true")
    assert res.exit_code == 0 and "trained to step 2" in res.output, res.output
    saved = json.loads((tmp_path / "short" / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["model"]["elastic"]["coupled"] is True
    shipped = json.loads((tmp_path / "short" / "model" / "config.json").read_text())
    assert shipped["elastic"]["coupled"] is True  # the model folder carries its elastic settings


def test_time_limited_run_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    res = train(trained, tmp_path / "split", "max_minutes=1e-9")
    assert res.exit_code == 0 and "nothing exported" in res.output, res.output
    assert not (tmp_path / "split" / "model").exists()
    res = train(trained, tmp_path / "split")
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    whole = load_file(str(trained / "run" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert whole.keys() == split.keys() and all(np.array_equal(whole[k], split[k]) for k in whole)
    assert [r["step"] for r in records(tmp_path / "split") if "loss" in r] == [1, 2, 3, 4]  # none twice
    res = train(trained, tmp_path / "split", "model.dim=64", "steps=5")
    assert res.exit_code == 2 and "other settings (model.dim)" in res.output, res.output
    res = invoke("train", TINY, "--set", f"vq_dir={trained / 'vq'}", "--set", "model.dim=64", "--output-dir",
                 tmp_path / "split", "--fresh")
    assert res.exit_code == 0 and "resumed" not in res.output and "trained to step 4" in res.output, res.output
    res = invoke("train", TINY, "--set", f"vq_dir={trained / 'vq'}", "--set", "max_minutes=1e-9", "--output-dir",
                 tmp_path / "split", "--fresh")
    assert res.exit_code == 0 and not (tmp_path / "split" / "model").exists()  # no stale model of the last run


def test_inplace_distillation_runs_on_the_shrunken_steps(trained, tmp_path):
    res = train(trained, tmp_path / "kd", "steps=8", "model.elastic.coupled=true", "model.elastic.distill=1.0")
    assert res.exit_code == 0, res.output
    kd = [r["i2t_text_kd"] for r in records(tmp_path / "kd") if "i2t_text_kd" in r]
    assert kd and all(v >= 0 for v in kd)
    res = train(trained, tmp_path / "bad", "model.elastic.distill=-1")
    assert res.exit_code == 2 and "model.elastic.distill: must be >= 0" in res.output, res.output
    assert not (tmp_path / "bad").exists()


def test_anchor_cut_training_resumes_and_rejects_bad_cuts(trained, tmp_path):
    sets = ["steps=6", "model.num_layers=4", "model.elastic.nested=true", "model.elastic.coupled=true",
            "model.elastic.anchor=1.0", "model.elastic.anchor_cut=[3,4,1]"]
    res = train(trained, tmp_path / "a", *sets, "max_minutes=1e-9")
    assert res.exit_code == 0 and "nothing exported" in res.output, res.output
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())["model"]["elastic"]
    assert saved["anchor"] == 1.0 and saved["anchor_cut"] == [3, 4, 1]
    res = train(trained, tmp_path / "a", *sets)  # the JSON list [3, 4, 1] matches (3, 4, 1)
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    logged = [r for r in records(tmp_path / "a") if "loss" in r]
    cut, full = (3.0, 4.0, 1.0), (4.0, 8.0, 2.0)  # tiny: 8 experts, k=2
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all((r["sub_layers"], r["sub_experts"], r["sub_top_k"]) in (cut, full) for r in logged)
    for bad, message in (("[3,4,9]", "does not fit"), ("[3,4]", "expected 3 values"),
                         ('["a","b","c"]', "expected int")):
        res = train(trained, tmp_path / "bad", *sets[:-1], f"model.elastic.anchor_cut={bad}")
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "bad").exists()
    res = train(trained, tmp_path / "bad", *sets[:-2], "model.elastic.anchor=1.5")
    assert res.exit_code == 2 and "model.elastic.anchor: must be <= 1" in res.output


def test_checkpoint_from_before_a_new_setting_resumes_and_another_setting_is_refused(trained, tmp_path):
    res = train(trained, tmp_path / "old", "max_minutes=1e-9")
    assert res.exit_code == 0, res.output
    res = train(trained, tmp_path / "old", "model.elastic.anchor=0.5")
    assert res.exit_code == 2 and "other settings (model.elastic.anchor)" in res.output, res.output
    state_file = next((tmp_path / "old" / "checkpoints").iterdir()) / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("anchor", "anchor_cut"):  # as written before these settings existed
        del state["config"]["model"]["elastic"][key]
    state_file.write_text(json.dumps(state))
    res = train(trained, tmp_path / "old")  # a setting the checkpoint does not record counts as unchanged
    assert res.exit_code == 0 and "resumed" in res.output, res.output


def test_generate_caption_extract_eval(trained, tmp_path):
    model = trained / "run" / "model"
    res = invoke("generate-image", model, "a red circle to the left of a blue square", "-o", tmp_path / "a.png")
    assert res.exit_code == 0, res.output
    info = last_json(res.output)
    assert info["decoding_steps"] == 4 and info["tokens"] == 16  # 4x4 tokens, one row per step
    assert Image.open(tmp_path / "a.png").size == (16, 16)
    res = invoke("generate-image", model, "two green squares", "-o", tmp_path / "grid.png", "--n", 2,
                 "--top-k", 1, "--depth", 1)
    assert res.exit_code == 0, res.output
    res = invoke("caption", model, tmp_path / "a.png")
    assert res.exit_code == 0, res.output
    assert isinstance(last_json(res.output)["caption"], str)

    res = invoke("extract-submodel", model, tmp_path / "small", "--depth", 1, "--experts", 4, "--top-k", 1)
    assert res.exit_code == 0, res.output
    info = last_json(res.output)
    assert info["submodel"]["layers"] == [0] and info["submodel"]["top_k"] == 1
    assert info["params"]["active"] < info["source_params"]["active"]
    small_cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (small_cfg["num_layers"], small_cfg["num_experts"], small_cfg["top_k"]) == (1, 4, 1)
    res = invoke("extract-submodel", model, tmp_path / "picked", "--depth", 1, "--experts", 4, "--top-k", 1,
                 "--select-on-val", "--select-n", 3, "--select-tasks", "i2t")
    assert res.exit_code == 0, res.output
    info = last_json(res.output)
    chosen_on = info["selection"]["selection_set"]
    assert chosen_on["split"] == "val" and chosen_on["tasks"] == ["i2t"]
    assert len(info["submodel"]["layers"]) == 1 and all(len(e) == 4 for e in info["submodel"]["experts"].values())

    res = invoke("eval", tmp_path / "small", "--n-text", 8, "--n-caption", 4, "--per-kind", 1, "--no-speed",
                 "--out", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    summary = last_json(res.output)
    assert summary["text_perplexity"] > 1 and 0 <= summary["caption_accuracy"] <= 1
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["image_alignment"]["n"] == 3 and report["submodel"]["layers"] == [0]
    assert set(report["routing"]) >= {"text", "image", "text_image_cosine"}

    res = invoke("eval", tmp_path / "small", "--n-text", 8, "--n-caption", 4, "--per-kind", 0, "--no-speed")
    assert res.exit_code == 0, res.output  # captions and text only, no image generation
    summary = last_json(res.output)
    assert summary["image_alignment"] is None and 0 <= summary["caption_accuracy"] <= 1


def test_bad_input_gives_clear_errors(trained, tmp_path):
    model = trained / "run" / "model"
    res = invoke("generate-image", tmp_path / "nowhere", "a red circle")
    assert res.exit_code == 2 and "not a unified model folder" in res.output
    res = invoke("extract-submodel", model, tmp_path / "x", "--top-k", 9)
    assert res.exit_code == 2 and "top_k" in res.output
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(big)
    res = invoke("caption", model, big)
    assert res.exit_code == 2 and "reads 16x16" in res.output
    (tmp_path / "junk.png").write_text("not an image")
    res = invoke("caption", model, tmp_path / "junk.png")
    assert res.exit_code == 2 and "cannot read image" in res.output
    res = invoke("train", CONFIGS / "moe.json", "--set", f"vq_dir={trained / 'vq'}", "--output-dir", tmp_path / "r")
    assert res.exit_code == 2 and "the model expects" in res.output  # cpu model vs tiny VQ
    res = train(trained, tmp_path / "r", "vq_dir=nowhere")
    assert res.exit_code == 2 and "holds no VQ tokenizer" in res.output
    res = train(trained, tmp_path / "r", "model.elastic.nested_draws=true")
    assert res.exit_code == 2 and "has no field 'nested_draws'" in res.output
    res = invoke("train", tmp_path / "missing.json")
    assert res.exit_code == 2 and "config file not found" in res.output
    (tmp_path / "typo.json").write_text(json.dumps({"stepz": 3}))
    res = invoke("vq", tmp_path / "typo.json")
    assert res.exit_code == 2 and "unknown config keys ['stepz']" in res.output
    assert not (tmp_path / "r").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "vq_config.json", "vq.safetensors"):
        (broken / f).write_bytes((model / f).read_bytes())
    cfg = json.loads((model / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "dim": 64, "num_heads": 2}))
    (broken / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    res = invoke("eval", broken, "--no-speed")
    assert res.exit_code == 2 and "do not fit" in res.output
