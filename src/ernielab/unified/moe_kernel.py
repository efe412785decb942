"""The fused CPU routed-experts kernel (kernels/moe_experts.c): built once with the host's C compiler,
loaded with ctypes, used by MoEFeedForward for small inference calls (decoding).

The build goes to a cache folder keyed by the source, the flags and the machine (ERNIELAB_KERNEL_CACHE,
default ~/.cache/ernielab/kernels), written atomically, so concurrent processes and later runs reuse it.
Where no compiler is found or the build fails, `load()` returns None once with a warning and the MoE layer
keeps its torch dispatch; ERNIELAB_NO_KERNELS=1 turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "moe_experts.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("ERNIELAB_KERNEL_CACHE", Path.home() / ".cache" / "ernielab" / "kernels"))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str, source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (once per source, flags, compiler and machine); returns the .so path."""
    code = source.read_bytes()
    key = hashlib.sha256(code + repr((FLAGS, compiler, platform.machine(), platform.node())).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(source), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}:\n{result.stderr.strip()}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    return target


@functools.lru_cache(maxsize=1)
def load():
    """The kernel's C function, or None (kernels off, no compiler, or a failed build: warned once)."""
    if os.environ.get("ERNIELAB_NO_KERNELS", "") not in ("", "0"):
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C compiler found: the MoE layer uses its torch dispatch for small calls", stacklevel=2)
        return None
    try:
        fn = ctypes.CDLL(str(build(compiler))).ernielab_moe_experts
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"MoE CPU kernel unavailable, using the torch dispatch: {err}", stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr]
    fn.restype = ctypes.c_int
    return fn


def supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The kernel computes float32 on CPU without autograd."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights))


def routed_experts(x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [N, D] += sum_j gate[:, j] * expert_{index[:, j]}(x) (GeGLU experts, fused gate|up weights),
    in place; x [N, D], index and gate [N, k]. Call only when `load()` and `supports(...)` hold."""
    fn = load()
    num_experts, dim, two_h = w_gate_up.shape
    if (x.dim() != 2 or x.shape[1] != dim or w_down.shape != (num_experts, two_h // 2, dim) or out.shape != x.shape
            or index.dim() != 2 or index.shape[0] != x.shape[0] or gate.shape != index.shape):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, index {tuple(index.shape)}, gate {tuple(gate.shape)}, "
                         f"w_gate_up {tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}, out {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous: the kernel adds into its storage")
    x, index = x.contiguous(), index.to(torch.int64).contiguous()  # the kernel reads int64 ids
    gate, w_gate_up, w_down = gate.float().contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    status = fn(x.data_ptr(), x.shape[0], dim, index.data_ptr(), gate.data_ptr(), index.shape[1],
                w_gate_up.data_ptr(), w_down.data_ptr(), num_experts, two_h // 2, out.data_ptr())
    if status == -1:
        raise ValueError(f"expert index outside [0, {num_experts})")
    if status != 0:
        raise MemoryError("MoE CPU kernel could not allocate its buffers")
    return out
