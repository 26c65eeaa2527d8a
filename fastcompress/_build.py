"""What the C++ extensions are built from and with: one place for the just-in-time build
(``_ext.py``) and the optional ahead-of-time build (``setup.py`` with FASTCOMPRESS_AOT=1).

Imports nothing from torch at module level, so setup.py can read it before torch is
imported (and a pure-Python install never imports torch at all).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent


def csrc_root() -> pathlib.Path:
    """The C++ sources: ``csrc/`` beside the package in a checkout (editable install or
    source tree), else the copy shipped inside the installed package."""
    checkout = PACKAGE.parent / "csrc"
    if (checkout / "cpu").is_dir():
        return checkout
    return PACKAGE / "_csrc"


# The binding (compiled for the baseline) and one build of all kernels per ISA level;
# ops.cpp picks the level at run time (FASTCOMPRESS_CPU_ISA or the CPU's best).
CPU_SOURCE_NAMES = ("ops.cpp", "isa_baseline.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
CUDA_SOURCE_NAMES = ("mcq_binding.cpp", "mcq_search.cu")
# No -march: every level is compiled into the one library through `#pragma GCC target`
# (csrc/cpu/isa_*.cpp), so the same binary runs on any x86-64 CPU, ahead of time or
# just in time. -ffp-contract=fast: the kernels spell out the FMAs whose rounding must
# match a scalar chain (simd::fmav); everywhere else contraction is free speed.
# No -std either: torch.utils.cpp_extension picks the standard the installed torch's
# headers need (C++17 up to torch 2.13, C++20 from 2.14 on), and the sources build as both.
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
CPU_LDFLAGS = ["-fopenmp"]


def on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_sources(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    root = root or csrc_root()
    return [root / "cpu" / name for name in CPU_SOURCE_NAMES]


def cpu_headers(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Everything the CPU sources include: the shared headers and the kernel bodies."""
    root = root or csrc_root()
    cpu = [p for p in (root / "cpu").glob("*") if p.suffix in (".h", ".inc")]
    return sorted((root / "include" / "fastcompress").glob("*")) + sorted(cpu)


def compiler_id() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def build_key(flags: list[str], torch_version: str) -> str:
    """Hash of everything the binary depends on: source and header contents, flags, the
    torch and Python versions, the compiler and the machine architecture. Two checkouts,
    two torches or two edits never share a build."""
    digest = hashlib.sha256()
    root = csrc_root()
    for path in cpu_sources(root) + cpu_headers(root):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (
        *flags,
        torch_version,
        sys.version.split()[0],
        compiler_id(),
        platform.machine(),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cuda_library_headers() -> list[str]:
    """Include folders of the CUDA libraries that ATen's CUDA headers name (cusparse.h,
    cublas_v2.h, ...) where they come from pip (``nvidia/cu13/include`` beside a CUDA
    torch) rather than from a full CUDA toolkit."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    found = []
    for base in spec.submodule_search_locations if spec else []:
        for header in sorted(pathlib.Path(base).glob("*/include/cusparse.h")):
            found.append(str(header.parent))
    return found


def setup_extensions():
    """ext_modules and cmdclass for the ahead-of-time build against the installed torch.
    The loader uses the CPU library only while its build key matches the sources in hand."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        # torch infers CUDA_HOME from where nvcc is; an nvcc wrapper in /usr/local/bin
        # would give /usr/local, which has no CUDA headers.
        for home in (
            "/usr/local/cuda",
            os.path.dirname(os.path.dirname(shutil.which("nvcc") or "")),
        ):
            if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = home
                break
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    root = PACKAGE.parent / "csrc"
    include = [str(root / "include")]
    rel = [os.path.relpath(p, PACKAGE.parent) for p in cpu_sources(root)]
    ext_modules = [
        CppExtension(
            "fastcompress._C_cpu",
            rel,
            include_dirs=include,
            extra_compile_args=CPU_CFLAGS,
            extra_link_args=CPU_LDFLAGS,
        )
    ]
    if torch.version.cuda is not None and shutil.which("nvcc"):
        ext_modules.append(
            CUDAExtension(
                "fastcompress._C_cuda",
                [f"csrc/cuda/{name}" for name in CUDA_SOURCE_NAMES],
                include_dirs=include + cuda_library_headers(),
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    # The key is compiled into the library as a marker string (ops.cpp), so the loader
    # can read it from the file, whatever the install copied where, without loading it.
    key = build_key(CPU_CFLAGS, torch.__version__)
    ext_modules[0].extra_compile_args = CPU_CFLAGS + [f"-DFASTCOMPRESS_BUILD_KEY={key}"]
    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def library_build_key(path: str) -> str | None:
    """The build key compiled into an ahead-of-time library, or None."""
    import re

    with open(path, "rb") as f:
        found = re.search(rb"FASTCOMPRESS_BUILD_KEY=([0-9a-f]{16})", f.read())
    return found.group(1).decode() if found else None
