"""The fused CPU routed-experts kernel (kernels/moe_experts.c): built once with the host's C compiler,
loaded with ctypes, used by MoEFeedForward for small inference calls (decoding).

The build goes to a cache folder keyed by the source, the flags and the machine (ERNIELAB_KERNEL_CACHE,
default ~/.cache/ernielab/kernels), written atomically, so concurrent processes and later runs reuse it.
A cached library is code we run, so it is trusted only inside a private folder (ours, a real folder, nobody
else can write; else a fresh temp folder is used) and only when its SHA-256 matches the JSON sidecar written
with it; anything else (planted, truncated, no sidecar) is rebuilt, never loaded.
Where no compiler is found or the build fails, `load()` returns None once with a warning and the MoE layer
keeps its torch dispatch; ERNIELAB_NO_KERNELS=1 turns the kernel off.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import stat
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


def _ours(path: Path, kind=stat.S_ISDIR) -> bool:
    """`path` itself (no symlink followed) is of `kind`, owned by us and writable by nobody else."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_dir(wanted: Path) -> Path:
    """`wanted` (created 0700) if it is ours alone, else a private temp folder: anyone who can write into the
    cache could swap the library we load. Checked on every build; an OSError means the torch dispatch."""
    with contextlib.suppress(OSError):
        wanted.mkdir(mode=0o700, parents=True, exist_ok=True)
    return wanted if _ours(wanted) else _fallback_dir(wanted)


@functools.lru_cache(maxsize=None)
def _fallback_dir(unsafe: Path) -> Path:
    """One fresh folder per process and unsafe cache (mkdtemp makes it 0700), removed at exit."""
    fallback = Path(tempfile.mkdtemp(prefix="ernielab-kernels-"))
    atexit.register(shutil.rmtree, fallback, ignore_errors=True)  # a loaded library stays mapped
    warnings.warn(f"kernel cache {unsafe} is not private to this user: building into {fallback}", stacklevel=2)
    return fallback


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path, record: dict) -> bool:
    """The library is ours and hashes to what its sidecar (also ours) recorded at build time."""
    sidecar = target.with_suffix(".json")
    if not (_ours(target, stat.S_ISREG) and _ours(sidecar, stat.S_ISREG)):
        return False
    try:
        return json.loads(sidecar.read_text()) == {**record, "sha256": _sha256(target)}
    except (OSError, ValueError):
        return False


def build(compiler: str, source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (once per source, flags, compiler and machine); returns the .so path,
    verified against its sidecar or freshly rebuilt."""
    code = source.read_bytes()
    record = {"source_sha256": hashlib.sha256(code).hexdigest(), "compiler": compiler, "flags": list(FLAGS),
              "machine": platform.machine(), "node": platform.node()}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    target = _private_dir(cache_dir()) / f"{source.stem}-{key}.so"
    if _verified(target, record):
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built, sidecar = Path(tmp) / target.name, Path(tmp) / "sidecar.json"
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(source), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}:\n{result.stderr.strip()}")
        built.chmod(0o700)  # whatever the umask, the check above must accept it next time
        sidecar.write_text(json.dumps({**record, "sha256": _sha256(built)}))
        sidecar.chmod(0o600)
        # atomic renames: a concurrent build of the same key writes the same bytes, and a reader seeing
        # the new library before its sidecar only fails the check and rebuilds
        os.replace(built, target)
        os.replace(sidecar, target.with_suffix(".json"))
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
