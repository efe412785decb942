"""`ernielab sparse` commands end to end on tiny data (CliRunner on the typer app)."""
import json

from typer.testing import CliRunner

from ernielab.sparse.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_listops_generate_train_eval_resume(tmp_path):
    data, run = tmp_path / "listops", tmp_path / "run"
    res = invoke("gen-listops", data, "--num-train", 40, "--num-val", 8, "--num-test", 8,
                 "--min-length", 10, "--max-length", 40, "--max-depth", 4)
    assert res.exit_code == 0, res.output
    assert (data / "basic_train.tsv").read_text().startswith("Source\tTarget\n")
    common = ["train", "--task", "listops", "--data", data, "--run-dir", run, "--preset", "tiny",
              "--attention", "hst", "--sar-alpha", 0.5, "--batch-size", 8, "--eval-every", 2, "--threads", 1]
    res = invoke(*common, "--steps", 2)
    assert res.exit_code == 0, res.output
    result = last_json(res.output)
    assert result["step"] == 2 and result["test"]["count"] == 8
    res = invoke(*common, "--steps", 4)  # continues the same run
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["step"] == 4 and "resumed" in res.output
    res = invoke("eval", "--run-dir", run, "--split", "val")
    assert res.exit_code == 0, res.output
    metrics = last_json(res.output)
    assert metrics["step"] == 4 and metrics["count"] == 8 and 0 <= metrics["accuracy"] <= 1
    res = invoke("eval", "--run-dir", run, "--topology", "dense")
    assert res.exit_code == 0 and last_json(res.output)["topology"] == "dense"
    best_val = max(r["accuracy"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r.get("split") == "val")
    res = invoke("eval", "--run-dir", run, "--split", "val", "--best")
    assert res.exit_code == 0, res.output
    best = last_json(res.output)
    assert best["checkpoint"] == "best" and best["step"] in (2, 4) and best["accuracy"] == best_val
    res = invoke(*common, "--steps", 4, "--set", "dim=64")  # same folder, other model: refused
    assert res.exit_code == 2 and "different model config" in res.output


def test_text_task_and_bad_input(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    rows = "".join(f"{'good' if i % 2 else 'awful'} movie {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    (folder / "train.tsv").write_text("Source\tTarget\n" + rows)
    (folder / "test.tsv").write_text("Source\tTarget\nokay\tpos\n")
    run = tmp_path / "run"
    res = invoke("train", "--task", "text", "--data", folder, "--run-dir", run, "--preset", "tiny",
                 "--attention", "bigbird", "--steps", 2, "--batch-size", 8)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "task.json").read_text())["labels"] == ["neg", "pos"]
    assert last_json(res.output)["test"]["count"] == 1
    (folder / "odd.tsv").write_text("Source\tTarget\nfine\tmaybe\n")
    res = invoke("eval", "--run-dir", run, "--file", folder / "odd.tsv")
    assert res.exit_code == 2 and "not one of the training labels" in res.output
    res = invoke("eval", "--run-dir", tmp_path / "nowhere")
    assert res.exit_code == 2 and "error:" in res.output
    res = invoke("train", "--task", "text", "--data", folder, "--run-dir", run, "--preset", "huge")
    assert res.exit_code == 2 and "unknown preset" in res.output
    res = invoke("train", "--task", "listops", "--data", tmp_path / "missing", "--run-dir", tmp_path / "r2")
    assert res.exit_code == 2 and "not found" in res.output


def test_gen_pathfinder_and_train(tmp_path):
    data = tmp_path / "pf"
    res = invoke("gen-pathfinder", data, "--num-train", 8, "--num-val", 4, "--num-test", 4, "--size", 16)
    assert res.exit_code == 0, res.output
    res = invoke("train", "--task", "pathfinder", "--data", data, "--run-dir", tmp_path / "run", "--preset", "tiny",
                 "--max-len", 256, "--attention", "dense", "--steps", 1, "--batch-size", 4)
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["test"]["count"] == 4
    res = invoke("train", "--task", "pathfinder", "--data", data, "--run-dir", tmp_path / "run2", "--preset", "tiny")
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
