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
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-std=c++17", "-Wno-psabi"]
CPU_LDFLAGS = ["-fopenmp"]


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


def setup_extensions():
    """ext_modules and cmdclass for the ahead-of-time build against the installed torch.
    Each built library gets a ``.key`` file beside it with its build key; the loader uses
    it only while that key matches the sources in hand."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    key = build_key(CPU_CFLAGS, torch.__version__)

    class BuildWithKey(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            super().build_extension(ext)
            if ext.name == "fastcompress._C_cpu":
                pathlib.Path(self.get_ext_fullpath(ext.name) + ".key").write_text(key)

    return ext_modules, {"build_ext": BuildWithKey}
