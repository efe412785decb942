"""Every benchmarks/unified_*.py script keeps a smoke mode that runs in seconds and writes its report where
--out says (by default under outputs/, never over the tracked reports in benchmarks/results)."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("unified_*.py"))


@pytest.fixture(scope="module", autouse=True)
def benchmarks_on_path():
    sys.path.insert(0, str(BENCHMARKS))  # as when a script there runs (they import each other)
    yield
    sys.path.remove(str(BENCHMARKS))


def test_every_script_is_covered():
    assert SCRIPTS == ["unified_cut_retention", "unified_decode_profile", "unified_moe_dispatch",
                       "unified_next_scale", "unified_rl_eval", "unified_speculative", "unified_speed", "unified_table"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_mode_writes_its_report_to_out(name, tmp_path, capsys):
    module = importlib.import_module(name)
    out = tmp_path / ("table" if name == "unified_table" else "report.json")
    extra = ["--no-progress"] if name == "unified_table" else []
    module.main(["--smoke", "--out", str(out), *extra])
    report = out / "results.json" if name == "unified_table" else out
    assert json.loads(report.read_text())
    code = (BENCHMARKS / f"{name}.py").read_text().split('"""', 2)[2]  # past the docstring
    assert 'default=Path("outputs/' in code and "benchmarks/results" not in code  # reports default to outputs/
