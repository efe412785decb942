"""Every benchmarks/*.py runs end to end in its smoke mode (seconds, tiny or bundled models) as a script, in a
scratch working folder, and writes nothing over the tracked reports in benchmarks/results.

benchmarks/unified_*.py are covered by tests/unified/test_unified_benchmarks.py; benchmarks/sparse_*.py and
serve_load.py are not run here (other owners); scripts/smoke_benchmarks.sh runs every one of them from the
repository root.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
SMOKE = {  # script -> its smoke arguments
    "aesthetic": ["--smoke"],
    "alignment_detector": ["--smoke"],
    "dpo": ["--smoke"],
    "enhancer": ["--smoke"],
    "enhancer_paraphrase": ["--smoke"],
    "fid_floor": ["--smoke"],
    "transformer_speed": ["--smoke"],
    "turbo": ["--smoke"],
    "turbo_artifacts": ["--smoke"],
    "vilg_ablation": ["--smoke"],
}
COVERED_ELSEWHERE = ("unified_", "sparse_")
NOT_HERE = {"serve_load",  # starts three server processes (~35 s); scripts/smoke_benchmarks.sh runs it
            "gpu_image",  # tests/image/test_gpu_benchmark_smoke.py runs its smoke mode
            "gpu_moe_hst",  # tests/unified/test_gpu_moe_hst_smoke.py
            "paraphrase_eval"}  # tests/image/test_paraphrase_eval.py
# what each smoke run writes (relative to its working folder); the others only print
REPORTS = {
    "aesthetic": "outputs/aesthetic_benchmark_smoke/results.json",
    "dpo": "outputs/benchmarks/dpo_smoke/dpo.json",
    "enhancer": "outputs/enhancer_benchmark_smoke/enhancer.json",
    "turbo": "outputs/turbo/turbo_smoke.json",
    "turbo_artifacts": "outputs/turbo/artifacts_smoke.json",
    "vilg_ablation": "outputs/vilg_ablation_smoke/results.json",
}


def test_every_benchmark_has_a_smoke_command():
    mine = sorted(p.stem for p in BENCHMARKS.glob("*.py")
                  if not p.stem.startswith(COVERED_ELSEWHERE) and p.stem not in NOT_HERE)
    assert mine == sorted(SMOKE)
    listed = subprocess.run(["bash", str(ROOT / "scripts" / "smoke_benchmarks.sh"), "--list"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted(f"benchmarks/{p.name}" for p in BENCHMARKS.glob("*.py"))
    for name, args in SMOKE.items():
        assert f"benchmarks/{name}.py {' '.join(args)}" in listed


def tracked_reports() -> dict[str, tuple[int, int]]:
    """(mtime, size) of the committed reports these scripts could write (sparse/ and unified/ belong to others)."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in RESULTS.rglob("*")
            if p.is_file() and p.relative_to(RESULTS).parts[0] not in ("sparse", "unified")}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_mode_runs(name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    before = tracked_reports()
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *SMOKE[name]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if name in REPORTS:
        assert json.loads((tmp_path / REPORTS[name]).read_text()), f"{name}: no report at {REPORTS[name]}"
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.parts[0] == "outputs" for p in written), written  # smoke runs write under outputs/ only
    assert tracked_reports() == before  # benchmarks/results untouched
