"""Loading the C++ extensions.

The CPU extension is built just in time on first use (ninja, in a private folder moved
into place when complete; ``_cache.py`` has the rules that keep a shared or damaged cache
safe) into ``FASTCOMPRESS_CACHE_DIR/cpu-<key>``, where the key
hashes the sources, flags, torch, Python, compiler and architecture (``_build.py``). An
ahead-of-time build (``FASTCOMPRESS_AOT=1 pip install``) is used instead while its key
still matches. Either holds every ISA level; the level that runs is the CPU's best
unless FASTCOMPRESS_CPU_ISA (or ``forced_cpu_isa``) says otherwise. Without a compiler
the package still imports and runs on the reference backend; the reason is kept for
``fastcompress info``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable

import torch

from fastcompress import _build, _cache

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_root() -> pathlib.Path:
    """The cache folder in use (``FASTCOMPRESS_CACHE_DIR`` when it can be trusted)."""
    return _cache.root()


def avx512_emulation_requested() -> bool:
    """FASTCOMPRESS_EMULATE_AVX512=1: a test build (its own cache folder) whose avx512
    level is the AVX-512 kernels' code (16 lanes, 32-register blocking) compiled for AVX2,
    so that the parity tests exercise that level on a CPU without AVX-512. Never faster."""
    return os.environ.get("FASTCOMPRESS_EMULATE_AVX512", "0") == "1"


def jit_flags() -> list[str]:
    flags = list(_build.CPU_CFLAGS)
    if avx512_emulation_requested():
        flags.append("-DFC_EMULATE_AVX512")
    return flags


def jit_key() -> str:
    return _build.build_key(jit_flags(), torch.__version__)


def jit_build_dir() -> pathlib.Path:
    return cache_root() / f"cpu-{jit_key()}"


def _prebuilt_cpu_library() -> str | None:
    if avx512_emulation_requested():
        return None  # the ahead-of-time build is never the emulating one
    if os.environ.get("FASTCOMPRESS_IGNORE_AOT", "0") == "1":
        return None  # the just-in-time cache even where an AOT library is installed
    spec = importlib.util.find_spec("fastcompress._C_cpu")
    if spec is None or spec.origin is None:
        return None
    if _cache.elf_truncation(pathlib.Path(spec.origin)):
        return None  # a damaged install: build just in time rather than crash on load
    want = _build.build_key(_build.CPU_CFLAGS, torch.__version__)
    if _build.library_build_key(spec.origin) != want:
        return None  # built from other sources or for another torch: build just in time
    return spec.origin


_JIT_LIBRARY = {"cpu": "fastcompress_cpu_jit.so", "cuda": "fastcompress_cuda_jit.so"}


def _announce(what: str, seconds: str) -> Callable[[pathlib.Path], None]:
    def say(folder: pathlib.Path) -> None:
        _state["announced_at"] = time.perf_counter()
        print(
            f"fastcompress: building {what} (once, about {seconds} on 2 cores; "
            f"cached in {folder}) ...",
            file=sys.stderr,
            flush=True,
        )

    return say


def _jit_build_cpu(verbose: bool) -> str:
    from torch.utils import cpp_extension

    sources = _build.cpu_sources()
    if not sources[0].exists():
        raise RuntimeError(f"C++ sources not found at {sources[0].parent}")

    def build(folder: pathlib.Path) -> pathlib.Path:
        path = cpp_extension.load(
            name="fastcompress_cpu_jit",
            sources=[str(p) for p in sources],
            extra_include_paths=[str(_build.csrc_root() / "include")],
            extra_cflags=jit_flags(),
            extra_ldflags=_build.CPU_LDFLAGS,
            build_directory=str(folder),
            is_python_module=False,
            verbose=verbose or os.environ.get("FASTCOMPRESS_VERBOSE_BUILD", "0") == "1",
        )
        return pathlib.Path(path) if path else next(folder.glob("*.so"))

    levels = "baseline" + (", avx2, avx512" if _build.on_x86() else " (NEON)")
    library, built = _cache.build_once(
        "cpu", jit_key(), _JIT_LIBRARY["cpu"], build,
        _announce(f"the C++ CPU kernels for this CPU and torch {torch.__version__} "
                  f"(ISA levels {levels})", "1-2 minutes"),
    )  # fmt: skip
    if not built:
        torch.ops.load_library(str(library))
    else:
        _say_done("the C++ CPU kernels")
    _state["cpu_built_now"] = built
    return str(library.parent)


def _say_done(what: str) -> None:
    began = _state.pop("announced_at", None)
    if began is not None:
        seconds = time.perf_counter() - began
        print(f"fastcompress: {what} built in {seconds:.0f} s", file=sys.stderr, flush=True)


def load_cpu_extension(raise_on_error: bool = True, verbose: bool = False) -> bool:
    """Load (building if needed) the CPU extension; return whether it is usable."""
    with _lock:
        if "cpu" not in _state:
            try:
                if os.environ.get("FASTCOMPRESS_DISABLE_CPU_EXT", "0") == "1":
                    raise RuntimeError("disabled by FASTCOMPRESS_DISABLE_CPU_EXT=1")
                prebuilt = _prebuilt_cpu_library()
                if prebuilt is not None:
                    torch.ops.load_library(prebuilt)
                    _state["cpu_from"] = prebuilt
                else:
                    _state["cpu_from"] = _jit_build_cpu(verbose)
                _state["cpu"] = True
            except Exception as exc:  # no compiler, failed build: reference still works
                _state["cpu"] = False
                _state["cpu_error"] = f"{type(exc).__name__}: {exc}"
            if _state["cpu"]:
                try:
                    _apply_cpu_isa_env()
                except ValueError as exc:
                    _state["isa_error"] = exc
        if "isa_error" in _state:  # a bad forced level raises on every use, even under auto
            raise _state["isa_error"]
        if not _state["cpu"] and raise_on_error:
            raise RuntimeError(f"fastcompress CPU extension unavailable: {_state['cpu_error']}")
        return bool(_state["cpu"])


CPU_ISA_LEVELS = {"baseline": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {level: name for name, level in CPU_ISA_LEVELS.items()}


def _apply_cpu_isa_env() -> None:
    """FASTCOMPRESS_CPU_ISA: auto (the CPU's best level), avx512, avx2 or baseline. A level
    this CPU lacks is an error, raised however the extension was asked for."""
    name = os.environ.get("FASTCOMPRESS_CPU_ISA", "auto").strip().lower() or "auto"
    if name == "auto":
        return
    if name not in CPU_ISA_LEVELS:
        raise ValueError(
            f"FASTCOMPRESS_CPU_ISA must be one of auto, {', '.join(CPU_ISA_LEVELS)}; got {name!r}"
        )
    set_cpu_isa(name)


def supported_cpu_isas() -> list[str]:
    """ISA levels this CPU can run, best first (loads the extension)."""
    load_cpu_extension()
    best = int(torch.ops.fastcompress_cpu.max_isa_level())
    return [_ISA_NAMES[level] for level in range(best, 0, -1)]


def avx512_emulated() -> bool:
    """Whether the loaded library's avx512 level is the emulation on AVX2 (a test build)."""
    load_cpu_extension()
    return bool(torch.ops.fastcompress_cpu.avx512_emulated())


def cpu_isa() -> str:
    """The ISA level the C++ kernels run at now."""
    load_cpu_extension()
    return _ISA_NAMES[int(torch.ops.fastcompress_cpu.isa_level())]


def kernel_calls() -> dict[str, int]:
    """C++ kernel calls per ISA level since the library was loaded."""
    load_cpu_extension()
    calls = torch.ops.fastcompress_cpu.kernel_calls
    return {name: int(calls(level)) for name, level in CPU_ISA_LEVELS.items()}


def set_cpu_isa(name: str) -> None:
    """Run the C++ kernels at ``name`` (baseline, avx2, avx512) from now on."""
    if name not in CPU_ISA_LEVELS:
        raise ValueError(f"CPU ISA level must be one of {', '.join(CPU_ISA_LEVELS)}; got {name!r}")
    best = int(torch.ops.fastcompress_cpu.max_isa_level())
    if CPU_ISA_LEVELS[name] > best:
        raise ValueError(
            f"CPU ISA level {name!r} was forced (FASTCOMPRESS_CPU_ISA or set_cpu_isa) but this "
            f"CPU supports at most {_ISA_NAMES[best]!r}"
        )
    torch.ops.fastcompress_cpu.set_isa_level(CPU_ISA_LEVELS[name])


@contextlib.contextmanager
def forced_cpu_isa(name: str):
    """Within the block, the C++ kernels run at ``name``; the level before is restored."""
    before = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(before)


def built_now() -> bool:
    """Whether this process built the CPU extension (rather than loading a cached or
    ahead-of-time one)."""
    return bool(_state.get("cpu_built_now", False))


def cpu_error() -> str:
    return str(_state.get("cpu_error", ""))


def cpu_origin() -> str:
    """Where the loaded CPU extension came from (AOT library or JIT build folder)."""
    return str(_state.get("cpu_from", ""))


def _jit_build_cuda() -> None:
    """Build the CUDA extension for this torch and this GPU's architecture (cached like the
    CPU one; the key adds the architecture)."""
    import shutil

    from torch.utils import cpp_extension

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        raise RuntimeError("needs a torch with CUDA and nvcc to build the CUDA extension")
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    root = _build.csrc_root()
    sources = [root / "cuda" / name for name in _build.CUDA_SOURCE_NAMES]
    key = _build.build_key(["cuda", f"sm_{major}{minor}", *(p.name for p in sources)],
                           torch.__version__)  # fmt: skip

    def build(folder: pathlib.Path) -> pathlib.Path:
        path = cpp_extension.load(
            name="fastcompress_cuda_jit",
            sources=[str(p) for p in sources],
            extra_include_paths=[str(root / "include"), *_build.cuda_library_headers()],
            extra_cuda_cflags=["-O3"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=os.environ.get("FASTCOMPRESS_VERBOSE_BUILD", "0") == "1",
        )
        return pathlib.Path(path) if path else next(folder.glob("*.so"))

    library, built = _cache.build_once(
        "cuda", key, _JIT_LIBRARY["cuda"], build,
        _announce(f"the CUDA kernels for sm_{major}{minor}", "1 minute"),
    )  # fmt: skip
    if not built:
        torch.ops.load_library(str(library))
    else:
        _say_done("the CUDA kernels")


def load_cuda_extension(raise_on_error: bool = True) -> bool:
    """The CUDA extension: the ahead-of-time one where setup.py built it against a torch
    with CUDA, else built just in time on first use (a GPU, a CUDA torch and nvcc)."""
    with _lock:
        if "cuda" not in _state:
            try:
                if not torch.cuda.is_available():
                    raise RuntimeError("torch sees no CUDA device")
                spec = importlib.util.find_spec("fastcompress._C_cuda")
                if spec is not None and spec.origin is not None:
                    torch.ops.load_library(spec.origin)
                else:
                    _jit_build_cuda()
                _state["cuda"] = True
            except Exception as exc:
                _state["cuda"] = False
                _state["cuda_error"] = f"{type(exc).__name__}: {exc}"
        if not _state["cuda"] and raise_on_error:
            raise RuntimeError(f"fastcompress CUDA extension unavailable: {_state['cuda_error']}")
        return bool(_state["cuda"])
