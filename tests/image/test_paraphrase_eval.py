"""benchmarks/paraphrase_eval.py --smoke: the whole code path with the bundled model (2 prompts per kind, 2 steps),
in a scratch folder; it writes outputs/paraphrase_eval_smoke.json and nothing else. --merge joins per-seed runs."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paraphrase_eval.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("paraphrase_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_then_merge(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    monkeypatch.chdir(tmp_path)
    bench.main(["--smoke"])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["outputs/paraphrase_eval_smoke.json"]
    report = json.loads((tmp_path / written[0]).read_text())
    assert report["smoke"] and not report["partial"] and report["n"] == 2 and report["seeds"] == [0]
    by_kind = report["by_seed"]["0"]
    assert set(by_kind) == {"single", "count", "relation"}
    for result in by_kind.values():
        assert result["template"]["n"] == result["paraphrase"]["n"] == 2
        assert sum(result["paired_all"].values()) == 2
    assert report["generation"]["images"] == 12
    assert "| relation | paraphrase |" in capsys.readouterr().out

    other = json.loads((tmp_path / written[0]).read_text())
    other["seeds"], other["by_seed"] = [1], {"1": by_kind}
    (tmp_path / "seed1.json").write_text(json.dumps(other))
    bench.main(["--merge", written[0], "seed1.json", "--out", "merged.json"])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["seeds"] == [0, 1] and set(merged["by_seed"]) == {"0", "1"}
    assert merged["generation"]["images"] == 24 and "(seed 1)" in merged["table"]
