"""The C++ kernels at every ISA level this CPU has, side by side in one run: each level
is its own implementation, ``fastcompress[cpu:avx512]``, ``[cpu:avx2]``,
``[cpu:baseline]``. On an AVX-512 machine the AVX2 level stands in for an AVX2 CPU."""

from __future__ import annotations

import contextlib

from fastcompress import _ext


def cpu_impls() -> list[str]:
    if not _ext.load_cpu_extension(raise_on_error=False):
        return []
    return [f"fastcompress[cpu:{name}]" for name in _ext.supported_cpu_isas()]


def level_of(impl: str) -> str | None:
    return impl.split(":", 1)[1].rstrip("]") if impl.startswith("fastcompress[cpu:") else None


@contextlib.contextmanager
def at_level(impl: str):
    """Run the block with the C++ kernels at ``impl``'s level (no-op for other impls)."""
    level = level_of(impl)
    if level is None:
        yield
        return
    with _ext.forced_cpu_isa(level):
        yield
