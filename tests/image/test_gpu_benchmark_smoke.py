"""benchmarks/gpu_image.py --smoke: the GPU benchmark's whole code path on the CPU (tiny config, perf_counter instead
of CUDA events), in a scratch folder; it writes outputs/gpu_image_smoke.json and nothing else."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_image.py"


def test_gpu_image_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["outputs/gpu_image_smoke.json"]
    report = json.loads((tmp_path / written[0]).read_text())
    assert report["smoke"] and report["timer"] == "perf_counter" and report["errors"] == []
    sections = report["sections"]
    assert set(sections) == {"forward", "lora_train", "full_train", "pipeline"}
    fwd = sections["forward"]
    for mode in ("eager", "compile"):
        for size in (32, 64):
            row = fwd[f"{mode}_{size}"]
            assert row["ours_ms"] > 0 and row["diffusers_ms"] > 0 and row["ours_mfu"] > 0
            assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["max_abs_ref"])  # same weights, same outputs
    assert set(sections["lora_train"]) >= {"float32", "int8"}
    for base in ("float32", "int8"):
        lt = sections["lora_train"][base]
        assert lt["step_ms"] > 0 and 0 < lt["trainable_params"] < report["params"]
    assert sections["full_train"]["trainable_params"] == report["params"]
    pipe = sections["pipeline"]
    for mode in ("bf16", "offload", "int8"):
        assert pipe[mode]["32"]["images_per_s"] > 0 and pipe[mode]["64"]["images_per_s"] > 0
    assert pipe["int8"]["quant"]["bytes_after"] < pipe["int8"]["quant"]["bytes_before"]
    assert "images_per_s" in pipe["fp8"].get("32", {}) or "refused" in pipe["fp8"]
