"""`ernielab unified` end to end on tiny settings: train-vq, train (+ exact resume), generate-image,
caption, extract-submodel, eval, and clear errors on bad input."""
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.unified.cli import app

runner = CliRunner()
TRAIN = ["--preset", "tiny", "--t2i-batch", 2, "--i2t-batch", 2, "--text-batch", 2, "--train-size", 16,
         "--save-every", 2]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(output: str) -> dict:
    line = output.strip().splitlines()[-1]
    return json.loads(line[line.index("{"):])  # a progress bar may share the line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    res = invoke("train-vq", "--run-dir", root / "vq", "--preset", "tiny", "--steps", 3, "--batch-size", 4,
                 "--train-size", 16, "--eval-size", 4)
    assert res.exit_code == 0, res.output
    assert set(last_json(res.output)["val"]) >= {"psnr", "codes_used", "align_reconstruction"}
    res = invoke("train", "--run-dir", root / "run", "--vq", root / "vq", "--steps", 4, *TRAIN)
    assert res.exit_code == 0, res.output
    return root


def test_resume_reproduces_uninterrupted_run(trained, tmp_path):
    res = invoke("train", "--run-dir", tmp_path / "split", "--vq", trained / "vq", "--steps", 4, "--stop-after", 2,
                 *TRAIN)
    assert res.exit_code == 0 and last_json(res.output)["step"] == 2, res.output
    res = invoke("train", "--run-dir", tmp_path / "split", "--vq", trained / "vq", "--steps", 4, *TRAIN)
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    whole = load_file(str(trained / "run" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert whole.keys() == split.keys() and all(np.array_equal(whole[k], split[k]) for k in whole)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # no duplicated records after the resume
    res = invoke("train", "--run-dir", tmp_path / "split", "--vq", trained / "vq", "--steps", 4, *TRAIN,
                 "--set", "dim=64")
    assert res.exit_code == 2 and "different model config" in res.output


def test_inplace_distillation_runs_on_the_shrunken_steps(trained, tmp_path):
    res = invoke("train", "--run-dir", tmp_path / "kd", "--vq", trained / "vq", "--steps", 8, *TRAIN,
                 "--elastic-coupled", "--elastic-distill", 1.0)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert any("i2t_text_kd" in r for r in records) and all(r["i2t_text_kd"] >= 0 for r in records
                                                            if "i2t_text_kd" in r)
    res = invoke("train", "--run-dir", tmp_path / "bad", "--vq", trained / "vq", "--steps", 2, *TRAIN,
                 "--elastic-distill", -1)
    assert res.exit_code == 2 and "elastic_distill" in res.output


def test_anchor_cut_training_resumes_and_rejects_bad_cuts(trained, tmp_path):
    args = ["--vq", trained / "vq", "--steps", 6, *TRAIN, "--set", "num_layers=4", "--set", "elastic_nested=true",
            "--elastic-coupled", "--elastic-anchor", 1.0, "--anchor-cut", "3,4,1"]
    res = invoke("train", "--run-dir", tmp_path / "a", *args, "--stop-after", 3)
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["elastic_anchor"] == 1.0 and saved["anchor_cut"] == [3, 4, 1]
    res = invoke("train", "--run-dir", tmp_path / "a", *args)  # the JSON list [3, 4, 1] matches (3, 4, 1)
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    cut = {"layers": [0, 2, 3], "top_k": 1, "experts": {str(i): [0, 1, 2, 3] for i in (0, 2, 3)}}
    full = {"layers": None, "top_k": None, "experts": None}
    assert [r["step"] for r in records] == [3, 6] and all(r["last_submodel"] in (cut, full) for r in records)
    for bad, message in (("3,4,9", "does not fit"), ("3,4", "DEPTH,EXPERTS,TOP_K"), ("a,b,c", "DEPTH,EXPERTS,TOP_K")):
        res = invoke("train", "--run-dir", tmp_path / "bad", *args[:-1], bad)
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "bad").exists()
    res = invoke("train", "--run-dir", tmp_path / "bad", *args[:-4], "--elastic-anchor", 1.5)
    assert res.exit_code == 2 and "elastic_anchor" in res.output


def test_checkpoint_from_before_a_new_setting_resumes_at_its_default(trained, tmp_path):
    res = invoke("train", "--run-dir", tmp_path / "old", "--vq", trained / "vq", "--steps", 4, "--stop-after", 2,
                 *TRAIN)
    assert res.exit_code == 0, res.output
    state_file = next((tmp_path / "old" / "checkpoints").iterdir()) / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("elastic_anchor", "anchor_cut"):  # as written before these settings existed
        del state["config"]["train"][key]
    state_file.write_text(json.dumps(state))
    res = invoke("train", "--run-dir", tmp_path / "old", "--vq", trained / "vq", "--steps", 4, *TRAIN,
                 "--elastic-anchor", 0.5)
    assert res.exit_code == 2 and "elastic_anchor" in res.output  # not the default: a different run
    res = invoke("train", "--run-dir", tmp_path / "old", "--vq", trained / "vq", "--steps", 4, *TRAIN)
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
    res = invoke("train", "--run-dir", tmp_path / "r", "--vq", trained / "vq", "--preset", "huge")
    assert res.exit_code == 2 and "unknown preset" in res.output
    res = invoke("train", "--run-dir", tmp_path / "r", "--vq", trained / "vq", "--preset", "cpu", "--steps", 1)
    assert res.exit_code == 2 and "the model expects" in res.output  # cpu model vs tiny VQ
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "vq_config.json", "vq.safetensors"):
        (broken / f).write_bytes((model / f).read_bytes())
    cfg = json.loads((model / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "dim": 64, "num_heads": 2}))
    (broken / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    res = invoke("eval", broken, "--no-speed")
    assert res.exit_code == 2 and "do not fit" in res.output
