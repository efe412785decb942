"""The fused CPU routed-experts kernel (layers/kernels/moe_experts.c) against the torch dispatch."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ernielab.unified import moe_kernel
from ernielab.unified.moe import MoEFeedForward

needs_kernel = pytest.mark.skipif(moe_kernel.load() is None, reason="no C compiler to build the kernel")


def make_moe(dim, experts, hidden, top_k, seed=0):
    torch.manual_seed(seed)
    moe = MoEFeedForward(dim, experts, hidden, top_k, shared_hidden=8).eval()
    torch.nn.init.normal_(moe.router.proj.weight, std=0.5)
    return moe


@needs_kernel
@pytest.mark.parametrize("dim,experts,hidden,top_k", [(128, 16, 64, 4), (16, 8, 12, 2), (24, 5, 7, 3), (8, 3, 1, 1)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 33, 257])
@torch.no_grad()
def test_kernel_matches_grouped_dispatch(dim, experts, hidden, top_k, tokens):
    """Vector-width and odd sizes (column and gelu tails), 1..4+ rows per expert, empty experts."""
    moe = make_moe(dim, experts, hidden, top_k)
    x = torch.randn(tokens, dim) * 2
    index, gate = moe.router(x)
    base = torch.randn(tokens, dim)
    expected = moe.grouped_experts(x, index, gate, base=base.clone())
    got = moe_kernel.routed_experts(x, index, gate, moe.w_gate_up, moe.w_down, base.clone())
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@needs_kernel
@torch.no_grad()
def test_kernel_gelu_is_the_exact_erf_gelu():
    """One expert with identity weights computes gelu(x) * x per feature, over [-12, 12].

    The bound is derived, not fitted to one CPU: gelu(x) * x = 0.5 x^2 (1 + erf(x / sqrt 2)), so an absolute
    error e in erf costs 0.5 x^2 e. The kernel's erf (Abramowitz & Stegun 7.1.26) is within 1.5e-7, and its
    float32 evaluation (polynomial, exp, sums) adds a few units of float32 rounding (2^-23) on the scale of 1;
    both torch's and the kernel's final products round to a few ulps of the result. Vector width and FMA use
    differ between CPUs, which moves the rounding, not the bound. The tanh approximation misses it by ~100x."""
    width = 64
    x = torch.linspace(-12, 12, 64 * width).reshape(-1, width)
    eye = torch.eye(width)
    w_gate_up = torch.cat([eye, eye], 1)[None]
    index = torch.zeros(x.shape[0], 1, dtype=torch.long)
    got = moe_kernel.routed_experts(x, index, torch.ones(x.shape[0], 1), w_gate_up, eye[None], torch.zeros_like(x))
    exact = F.gelu(x.double()) * x.double()
    eps32 = 2.0**-23
    bound = 0.5 * x.double() ** 2 * (1.5e-7 + 8 * eps32) + 8 * eps32 * exact.abs()
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    tanh_err = (F.gelu(x.double(), approximate="tanh") * x.double() - exact).abs()
    assert (tanh_err > bound).any()  # the check can tell them apart


@needs_kernel
@torch.no_grad()
def test_kernel_rejects_bad_input_and_leaves_out_untouched():
    moe = make_moe(16, 4, 8, 2)
    x = torch.randn(3, 16)
    out = torch.randn(3, 16)
    before = out.clone()
    bad = torch.tensor([[0, 1], [2, 4], [1, 3]])  # expert 4 does not exist
    with pytest.raises(ValueError, match="outside"):
        moe_kernel.routed_experts(x, bad, torch.full((3, 2), 0.5), moe.w_gate_up, moe.w_down, out)
    assert torch.equal(out, before)
    good = bad.clamp_max(3)
    with pytest.raises(ValueError, match="shape mismatch"):  # one gate per token instead of one per assignment
        moe_kernel.routed_experts(x, good, torch.ones(3, 1), moe.w_gate_up, moe.w_down, out)
    expected = moe.grouped_experts(x, good, torch.full((3, 2), 0.5), base=torch.zeros(3, 16))
    got = moe_kernel.routed_experts(x, good.int(), torch.full((3, 2), 0.5), moe.w_gate_up, moe.w_down,
                                    torch.zeros(3, 16))  # int32 ids are widened, not misread
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    empty = moe_kernel.routed_experts(x[:0], good[:0], torch.ones(0, 2), moe.w_gate_up, moe.w_down, torch.zeros(0, 16))
    assert empty.shape == (0, 16)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe_kernel.routed_experts(torch.randn(3, 12), bad.clamp_max(3), torch.ones(3, 2), moe.w_gate_up,
                                  moe.w_down, torch.zeros(3, 12))


@needs_kernel
def test_auto_dispatch_picks_the_kernel_for_inference_only():
    moe = make_moe(16, 8, 12, 2)
    x = torch.randn(6, 16)
    assert moe.dispatch == "auto"
    with torch.no_grad():
        assert moe.resolved_dispatch(12, x) == "kernel"
        assert moe.resolved_dispatch(12, x.double()) == "fused"  # float32 only
    assert moe.resolved_dispatch(12, x) == "fused"  # autograd on: training path
    with torch.no_grad():
        auto = moe(x)
        moe.dispatch = "fused"
        torch.testing.assert_close(auto, moe(x), atol=1e-5, rtol=1e-5)


def test_failed_build_falls_back_to_the_torch_dispatch(tmp_path, monkeypatch):
    """A compiler that fails: warned once, no kernel, and "auto" keeps computing through torch."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("ERNIELAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("ERNIELAB_NO_KERNELS", raising=False)
    moe_kernel.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernel unavailable"):
            assert moe_kernel.load() is None
        moe = make_moe(16, 8, 12, 2)
        with torch.no_grad():
            assert moe.resolved_dispatch(4, torch.randn(2, 16)) == "fused"
            moe(torch.randn(2, 16))
            moe.dispatch = "kernel"
            with pytest.raises(RuntimeError, match="built kernel"):
                moe(torch.randn(2, 16))
        assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache
    finally:
        monkeypatch.undo()
        moe_kernel.load.cache_clear()


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIELAB_KERNEL_CACHE", str(tmp_path))
    compiler = moe_kernel._compiler()
    first = moe_kernel.build(compiler)
    stamp = first.stat().st_mtime_ns
    assert moe_kernel.build(compiler) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    changed = tmp_path / "moe_experts.c"
    changed.write_text(moe_kernel.SOURCE.read_text() + "\n/* changed */\n")
    assert moe_kernel.build(compiler, changed) != first


# The cache runs whatever library it finds under its name, so it must refuse anything it did not build.
PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
int ernielab_moe_experts(void) { return 0; } /* "succeeds" without computing anything */
"""
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """The cache pointed at a fresh folder (fallback temp folders under tmp_path too), `load()` re-run against
    it, the real cache restored after."""
    monkeypatch.setenv("ERNIELAB_KERNEL_CACHE", str(tmp_path / "cache" / "kernels"))
    monkeypatch.delenv("ERNIELAB_NO_KERNELS", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    moe_kernel.load.cache_clear()
    yield tmp_path / "cache" / "kernels"
    monkeypatch.undo()
    moe_kernel.load.cache_clear()


def assert_kernel_matches_torch():
    assert moe_kernel.load() is not None
    moe = make_moe(16, 8, 12, 2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        index, gate = moe.router(x)
        expected = moe.grouped_experts(x, index, gate, base=torch.zeros(5, 16))
        got = moe_kernel.routed_experts(x, index, gate, moe.w_gate_up, moe.w_down, torch.zeros(5, 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def assert_verified(library: Path):
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest() and library.stat().st_size > 0


@needs_kernel
@pytest.mark.parametrize("sidecar", ["missing", "forged", pytest.param("forged, not ours", marks=needs_root),
                                     "forged, group-writable"])
def test_planted_library_is_rebuilt_not_loaded(kernel_cache, tmp_path, sidecar):
    """A library planted under the cache's name never runs (its constructor would leave a marker); the kernel
    is rebuilt and computes. A sidecar that matches the plant does not help a file we do not own alone."""
    compiler = moe_kernel._compiler()
    target = moe_kernel.build(compiler)  # learn the exact name, then replace what is there
    genuine = json.loads(target.with_suffix(".json").read_text())
    marker = tmp_path / "planted-ran"
    (tmp_path / "planted.c").write_text(f"#define MARKER {json.dumps(str(marker))}\n" + PLANTED_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "planted.so"), str(tmp_path / "planted.c")],
                   check=True)
    subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", str(tmp_path / "planted.so")],
                   check=True)
    assert marker.exists()  # the plant works when loaded
    marker.unlink()
    for path in kernel_cache.iterdir():
        path.unlink()
    shutil.copyfile(tmp_path / "planted.so", target)
    planted_hash = hashlib.sha256(target.read_bytes()).hexdigest()
    if sidecar != "missing":
        forged = planted_hash if "," in sidecar else "0" * 64
        target.with_suffix(".json").write_text(json.dumps({**genuine, "sha256": forged}))
    if sidecar == "forged, not ours":
        os.chown(target, os.geteuid() + 12345, -1)
    if sidecar == "forged, group-writable":
        target.chmod(0o664)
    assert moe_kernel.load() is not None
    assert not marker.exists()  # the plant never ran
    assert_kernel_matches_torch()
    assert hashlib.sha256(target.read_bytes()).hexdigest() != planted_hash
    assert_verified(target)


@needs_kernel
@pytest.mark.parametrize("damage", ["empty library", "truncated library", "empty sidecar", "corrupt sidecar"])
def test_damaged_cache_entry_is_rebuilt(kernel_cache, damage):
    compiler = moe_kernel._compiler()
    target = moe_kernel.build(compiler)
    size = target.stat().st_size
    if damage.endswith("library"):
        os.truncate(target, 0 if damage == "empty library" else size // 2)
    else:
        target.with_suffix(".json").write_text("" if damage == "empty sidecar" else '{"sha256": ')
    assert moe_kernel.build(compiler) == target
    assert_verified(target)
    assert target.stat().st_size == size
    assert_kernel_matches_torch()


@needs_kernel
def test_cache_folder_and_files_are_private(kernel_cache):
    target = moe_kernel.build(moe_kernel._compiler())
    assert target.parent == kernel_cache
    assert stat.S_IMODE(kernel_cache.stat().st_mode) == 0o700 and kernel_cache.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(target.with_suffix(".json").stat().st_mode) == 0o600
    assert not target.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert_verified(target)


@needs_kernel
@pytest.mark.parametrize("unsafe", ["group-writable", "world-writable", "sticky world-writable", "symlink",
                                    pytest.param("not ours", marks=needs_root)])
def test_unsafe_cache_folder_is_not_used(kernel_cache, tmp_path, unsafe):
    """Someone else could swap the library in such a folder: build in a private temp folder instead."""
    real = tmp_path / "elsewhere" if unsafe == "symlink" else kernel_cache
    real.mkdir(parents=True)
    if unsafe == "symlink":
        kernel_cache.parent.mkdir()
        kernel_cache.symlink_to(real, target_is_directory=True)
    real.chmod({"group-writable": 0o770, "world-writable": 0o777, "sticky world-writable": 0o1777}.get(unsafe, 0o700))
    if unsafe == "not ours":
        os.chown(real, os.geteuid() + 12345, -1)
    with pytest.warns(UserWarning, match="not private"):
        target = moe_kernel.build(moe_kernel._compiler())
    assert not list(real.iterdir())
    assert target.parent.parent == tmp_path and target.parent.name.startswith("ernielab-kernels-")
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert_verified(target)
    assert_kernel_matches_torch()
    assert moe_kernel.load() is not None and not list(real.iterdir())
