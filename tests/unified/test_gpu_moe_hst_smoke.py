"""benchmarks/gpu_moe_hst.py --smoke runs every code path of the GPU benchmark on the CPU at toy sizes: every MoE
dispatch mode exact against the fp32 per-expert reference, eager and torch.compile'd points (aot_eager here),
HST-flex against the HST reference, and every attention point the CPU can run."""
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_moe_hst")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_smoke_runs_every_section_and_checks_exactness(bench, tmp_path):
    out = tmp_path / "report.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert out.exists() and set(report["sections"]) == set(bench.SECTIONS)
    rows = [r for section in report["sections"].values() for r in section]
    assert not [r for r in rows if "error" in r or "skipped" in r and r.get("pass") != "forward+backward"]

    check = {(r["dtype"], r["mode"]): r for r in report["sections"]["moe_check"]}
    assert set(check) == {(d, m) for d in ("bfloat16", "float32") for m in bench.MOE_MODES}
    for (dtype, mode), r in check.items():
        errors = [v for k, v in r.items() if k.startswith("rel_err_")]
        assert len(errors) == 5  # output and four gradients
        if dtype == "float32":  # the same values as the reference, up to float32 rounding
            assert max(errors) < 1e-5, (mode, r)
        else:
            assert r["within_2x_fused_bf16_error"] and max(errors) < 0.05, (mode, r)

    moe = report["sections"]["moe"]
    timed = {(r["variant"], r["pass"], r["compiled"]) for r in moe if r.get("time_ms", 0) > 0}
    passes = ("forward", "forward+backward")
    assert timed >= {(v, p, False) for v in ("dense", *bench.MOE_MODES) for p in passes}
    assert timed >= {(v, p, True) for v in ("dense", "gpu") for p in passes}
    assert all("moe_over_dense" in r for r in moe if "time_ms" in r and r["variant"] != "dense")
    assert {(r["tokens"], r["pass"]) for r in report["moe_summary"]} == {(64, p) for p in passes}

    hst_check = {r["impl"]: r for r in report["sections"]["hst_check"]}
    assert hst_check["flex"]["within_2x_sdpa_bf16_error"] and hst_check["flex"]["rel_err_seq"] < 0.02
    hst = {r["impl"]: r for r in report["sections"]["hst"] if "time_ms" in r}
    assert set(hst) == {"dense_flash_layer", "hst_flex_layer", "hst_sdpa_layer", "flash_kernel", "hst_flex_kernels"}
    assert report["hst_summary"][0]["flash_kernel_over_hst_flex_kernels"] > 0


def test_unknown_section_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--smoke", "--sections", "moe,attention", "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "r.json").exists()
