"""Loading the C++ extensions.

The CPU extension (``csrc/cpu``) is built ahead of time by ``setup.py`` when a compiler
is there, else just in time on first use with ninja (under a file lock, so two
processes never build at once). Without a compiler the package still imports and runs
on the reference backend; the reason is kept for ``fastcompress info``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import threading

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CPU_SOURCES = [
    CSRC / "cpu" / name for name in ("mcq_cpu.cpp", "decode_step_cpu.cpp", "context_pool_cpu.cpp")
]
CPU_HEADERS = [
    CSRC / "include" / "fastcompress" / "mcq_tile.cuh",
    CSRC / "include" / "fastcompress" / "decode_step.h",
    CSRC / "include" / "fastcompress" / "context_pool.h",
    CSRC / "include" / "fastcompress" / "simd.h",
]
# ISA is chosen at build time: a baseline x86-64 build is ~8x slower than AVX-512.
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c++17"]
CPU_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> pathlib.Path:
    base = os.environ.get("FASTCOMPRESS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastcompress"
    )
    return pathlib.Path(base) / f"torch-{torch.__version__}"


def _newest_source_mtime() -> float:
    return max(p.stat().st_mtime for p in CPU_SOURCES + CPU_HEADERS if p.exists())


def _prebuilt_cpu_library() -> str | None:
    spec = importlib.util.find_spec("fastcompress._C_cpu")
    if spec is None or spec.origin is None:
        return None
    if CPU_SOURCES[0].exists() and os.path.getmtime(spec.origin) < _newest_source_mtime():
        return None  # sources edited since the ahead-of-time build: rebuild just in time
    return spec.origin


def _jit_build_cpu() -> None:
    from filelock import FileLock
    from torch.utils import cpp_extension

    if not CPU_SOURCES[0].exists():
        raise RuntimeError(f"C++ sources not found at {CSRC} and no prebuilt extension")
    build_dir = cache_dir() / "cpu"
    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir / "build.lock")):
        cpp_extension.load(
            name="fastcompress_cpu_jit",
            sources=[str(p) for p in CPU_SOURCES],
            extra_include_paths=[str(CSRC / "include")],
            extra_cflags=CPU_CFLAGS,
            extra_ldflags=CPU_LDFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("FASTCOMPRESS_VERBOSE_BUILD", "0") == "1",
        )


def load_cpu_extension(raise_on_error: bool = True) -> bool:
    """Load (building if needed) the CPU extension; return whether it is usable."""
    with _lock:
        if "cpu" not in _state:
            try:
                if os.environ.get("FASTCOMPRESS_DISABLE_CPU_EXT", "0") == "1":
                    raise RuntimeError("disabled by FASTCOMPRESS_DISABLE_CPU_EXT=1")
                prebuilt = _prebuilt_cpu_library()
                if prebuilt is not None:
                    torch.ops.load_library(prebuilt)
                else:
                    _jit_build_cpu()
                _state["cpu"] = True
            except Exception as exc:  # no compiler, failed build: reference still works
                _state["cpu"] = False
                _state["cpu_error"] = f"{type(exc).__name__}: {exc}"
        if not _state["cpu"] and raise_on_error:
            raise RuntimeError(f"fastcompress CPU extension unavailable: {_state['cpu_error']}")
        return bool(_state["cpu"])


def cpu_error() -> str:
    return str(_state.get("cpu_error", ""))


def load_cuda_extension(raise_on_error: bool = True) -> bool:
    """The CUDA extension exists only where setup.py ran against a torch with CUDA."""
    with _lock:
        if "cuda" not in _state:
            spec = importlib.util.find_spec("fastcompress._C_cuda")
            ok = spec is not None and spec.origin is not None and torch.cuda.is_available()
            if ok:
                torch.ops.load_library(spec.origin)
            _state["cuda"] = ok
        if not _state["cuda"] and raise_on_error:
            raise RuntimeError("fastcompress CUDA extension is not built in this install")
        return bool(_state["cuda"])
