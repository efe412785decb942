"""`ernielab sparse` commands end to end on tiny data (CliRunner on the typer app)."""
import json
from pathlib import Path

from typer.testing import CliRunner

from ernielab.sparse.cli import app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sparse"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(output: str) -> dict:
    """The last JSON line of the output (progress bars write to the same stream, ending in carriage returns)."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def write_config(path: Path, **fields) -> Path:
    """A tiny run: the test-size model (`tiny` preset) on the given data."""
    base = {"model": {"vocab_size": 16, "num_classes": 10, "max_len": 64, "dim": 32, "depth": 2, "num_heads": 2,
                      "mlp_dim": 64, "block_size": 8, "num_global": 2, "num_random_blocks": 1},
            "steps": 2, "batch_size": 8, "warmup_steps": 1, "eval_every": 2}
    for key, value in fields.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    path.write_text(json.dumps(base))
    return path


def test_listops_generate_train_eval_resume(tmp_path):
    data, run = tmp_path / "listops", tmp_path / "run"
    res = invoke("gen-listops", data, "--num-train", 40, "--num-val", 8, "--num-test", 8,
                 "--min-length", 10, "--max-length", 40, "--max-depth", 4)
    assert res.exit_code == 0, res.output
    assert (data / "basic_train.tsv").read_text().startswith("Source\tTarget\n")
    assert json.loads((data / "listops_spec.json").read_text())["max_args"] == 10  # the spec's default
    config = write_config(tmp_path / "c.json", model={"attention": "hst", "sar_alpha": 0.5},
                          data={"task": "listops", "path": str(data)}, eval_every=1)
    common = ["train", config, "--output-dir", run, "--threads", 1]
    res = invoke(*common)
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output and last_json(res.output)["test"]["count"] == 8
    assert json.loads((run / "results.json").read_text())["test"]["count"] == 8
    res = invoke(*common, "--set", "steps=4")  # continues the same run
    assert res.exit_code == 0, res.output
    assert "trained to step 4" in res.output and "resumed" in res.output
    res = invoke("eval", run, "--split", "val")
    assert res.exit_code == 0, res.output
    metrics = last_json(res.output)
    assert metrics["step"] == 4 and metrics["count"] == 8 and 0 <= metrics["accuracy"] <= 1
    res = invoke("eval", run, "--topology", "dense")
    assert res.exit_code == 0 and last_json(res.output)["topology"] == "dense"
    best_val = max(r["eval"]["accuracy"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if "eval" in r)
    res = invoke("eval", run, "--split", "val", "--best")
    assert res.exit_code == 0, res.output
    best = last_json(res.output)
    assert best["checkpoint"] == "best" and best["step"] in (1, 2, 3, 4) and best["accuracy"] == best_val
    res = invoke(*common, "--set", "steps=4", "--set", "model.dim=64")  # same folder, other model: refused
    assert res.exit_code == 2 and "other settings (model.dim)" in res.output
    res = invoke("eval", run, "--topology", "sideways")
    assert res.exit_code == 2 and "--topology must be one of" in res.output


def test_train_a_documented_config_with_overrides(tmp_path, monkeypatch):
    """A shipped config as it is, scaled down with --set: its data section generates the (smaller) data, and
    `{seed}` in its output_dir names the run folder after the training seed."""
    monkeypatch.chdir(tmp_path)
    small = ["--set", "data.path=data", "--set", "data.listops.num_train=40", "--set", "data.listops.num_val=8",
             "--set", "data.listops.num_test=8", "--set", "batch_size=8", "--set", "eval_every=1"]
    res = invoke("train", CONFIGS / "listops_len128_5k_hst_sar.json", "--set", "steps=2", "--set", "seed=3", *small)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs/sparse/listops_len128_5k_hst_sar/seed3"
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["seed"] == 3 and saved["output_dir"] == "runs/sparse/listops_len128_5k_hst_sar/seed3"
    assert saved["model"]["block_size"] == 8 and saved["model"]["sar_alpha"] == 1.0
    assert json.loads((tmp_path / "data/listops_spec.json").read_text())["num_train"] == 40
    assert (run / "model" / "model.safetensors").is_file() and (run / "best" / "best.json").is_file()
    res = invoke("train", CONFIGS / "listops_len128_5k_hst_sar.json", "--set", "steps=2", *small,
                 "--set", "data.listops.num_train=50", "--output-dir", tmp_path / "other")
    assert res.exit_code == 2 and "generated with other settings (num_train)" in res.output
    assert not (tmp_path / "other").exists()


def test_time_limited_run_says_it_exported_nothing(listops_dir, tmp_path):
    config = write_config(tmp_path / "c.json", data={"task": "listops", "path": str(listops_dir)})
    run = tmp_path / "run"
    res = invoke("train", config, "--set", "steps=50", "--set", "max_minutes=1e-9", "--output-dir", run)
    assert res.exit_code == 0, res.output
    assert "time limit" in res.output and "nothing exported" in res.output
    assert not (run / "model").exists() and not (run / "results.json").exists()
    res = invoke("eval", run, "--split", "val")  # the checkpoint it left is usable
    assert res.exit_code == 0 and last_json(res.output)["step"] == 1


def test_text_task_and_bad_input(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    rows = "".join(f"{'good' if i % 2 else 'awful'} movie {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    (folder / "train.tsv").write_text("Source\tTarget\n" + rows)
    (folder / "test.tsv").write_text("Source\tTarget\nokay\tpos\n")
    run = tmp_path / "run"
    text = {"vocab_size": 257, "num_classes": 2, "attention": "bigbird"}
    config = write_config(tmp_path / "c.json", model=text, data={"task": "text", "path": str(folder)})
    res = invoke("train", config, "--output-dir", run)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "train_config.json").read_text())["data"]["labels"] == ["neg", "pos"]
    assert last_json(res.output)["test"]["count"] == 1
    (folder / "odd.tsv").write_text("Source\tTarget\nfine\tmaybe\n")
    res = invoke("eval", run, "--file", folder / "odd.tsv")
    assert res.exit_code == 2 and "not one of the training labels" in res.output
    res = invoke("eval", tmp_path / "nowhere")
    assert res.exit_code == 2 and "error:" in res.output
    res = invoke("train", config, "--set", "model.num_classes=3", "--output-dir", tmp_path / "r3")
    assert res.exit_code == 2 and "data has 2 classes; the model has num_classes=3" in res.output
    res = invoke("train", config, "--set", "model.dim=wide", "--output-dir", tmp_path / "r4")
    assert res.exit_code == 2 and "model.dim: expected int" in res.output
    res = invoke("train", write_config(tmp_path / "m.json", data={"task": "listops", "path": str(tmp_path / "missing")}),
                 "--output-dir", tmp_path / "r2")
    assert res.exit_code == 2 and "no listops training split" in res.output
    assert not any((tmp_path / name).exists() for name in ("r2", "r3", "r4"))


def test_gen_pathfinder_and_train(tmp_path):
    data = tmp_path / "pf"
    res = invoke("gen-pathfinder", data, "--num-train", 8, "--num-val", 4, "--num-test", 4, "--size", 16)
    assert res.exit_code == 0, res.output
    pixels = {"vocab_size": 257, "num_classes": 2, "max_len": 256, "attention": "dense"}
    config = write_config(tmp_path / "c.json", model=pixels, data={"task": "pathfinder", "path": str(data)})
    res = invoke("train", config, "--set", "steps=1", "--set", "batch_size=4", "--output-dir", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["test"]["count"] == 4
    res = invoke("train", config, "--set", "model.max_len=64", "--output-dir", tmp_path / "run2")
    assert res.exit_code == 2 and "256 pixels; model max_len is 64" in res.output


def test_gen_pathfinder_easy_level_options(tmp_path):
    data = tmp_path / "easy"
    res = invoke("gen-pathfinder", data, "--num-train", 4, "--num-val", 2, "--num-test", 2, "--size", 16,
                 "--gap", 0, "--marker-value", 128, "--match-distance", "--num-distractors", 0)
    assert res.exit_code == 0, res.output
    spec = json.loads((data / "pathfinder_spec.json").read_text())
    assert (spec["size"], spec["path_length"], spec["gap"], spec["marker_value"], spec["match_distance"],
            spec["num_distractors"]) == (16, 10, 0, 128, True, 0)
    res = invoke("gen-pathfinder", tmp_path / "bad", "--marker-value", 300)
    assert res.exit_code == 2 and "marker_value" in res.output
