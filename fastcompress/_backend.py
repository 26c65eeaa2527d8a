"""Backend selection.

``FASTCOMPRESS_BACKEND`` (or the ``backend=`` argument) forces one backend; a forced
backend that cannot run for the given tensors is an error, never a silent fallback.
``auto`` picks the fastest backend that has been verified for the tensor's device.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# GPU kernels that `auto` may use, per op: each only after its on-device parity probe
# passed on this GPU model with these versions (fastcompress/_probe.py). Filled by the
# op modules themselves (declare_gpu_kernels), beside their parity cases.
GPU_CANDIDATES: dict[str, tuple[str, ...]] = {}


def declare_gpu_kernels(
    family: str, candidates: dict[str, tuple[str, ...]], case: Callable | None = None
) -> None:
    """An op module's GPU kernels: ``candidates`` maps each op name (as passed to
    select_backend) to the backends ``auto`` may use for it, in order of preference;
    the ops share the parity case ``case(backend, device)`` of their ``family``."""
    from fastcompress import _probe

    for op, backends in candidates.items():
        GPU_CANDIDATES[op] = tuple(backends)
        _probe.FAMILIES[op] = family
    if case is not None:
        _probe.CASES[family] = case


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given tensors."""


def requested_backend(backend: str | None) -> str:
    name = backend or os.environ.get("FASTCOMPRESS_BACKEND") or "auto"
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"backend (or FASTCOMPRESS_BACKEND) must be one of {BACKENDS}, got {name!r}"
        )
    return name


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_extension_available() -> bool:
    from fastcompress import _ext

    return _ext.load_cpu_extension(raise_on_error=False)


def cuda_extension_available() -> bool:
    from fastcompress import _ext

    return _ext.load_cuda_extension(raise_on_error=False)


def backend_available(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``name`` can run on tensors of ``device``, and why not."""
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the 'cpu' backend takes CPU tensors, got device {device}"
        if not cpu_extension_available():
            from fastcompress import _ext

            return False, f"the C++ CPU extension could not be built or loaded: {_ext.cpu_error()}"
        return True, ""
    if name == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreted():
            return True, ""
        return False, (
            f"the 'triton' backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got device {device}"
        )
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the 'cuda' backend takes CUDA tensors, got device {device}"
        if not cuda_extension_available():
            from fastcompress import _ext

            why = _ext._state.get("cuda_error", "")
            return False, f"the CUDA extension could not be built or loaded: {why}"
        return True, ""
    return False, f"unknown backend {name!r}"


# How often each backend was chosen, per backend name: the tests check that a test
# parametrised with a backend ran it.
selections: collections.Counter[str] = collections.Counter()


def select_backend(device: torch.device, backend: str | None = None, *, op: str) -> str:
    """Resolve ``auto`` and check a forced backend; raise if it cannot run."""
    return record(_select(device, backend, op))


def record(name: str) -> str:
    """Count a choice of ``name`` (outside traced code, where the count is not kept)."""
    if not torch.compiler.is_compiling():
        selections[name] += 1
    return name


def _select(device: torch.device, backend: str | None, op: str) -> str:
    name = requested_backend(backend)
    if name != "auto":
        ok, why = backend_available(name, device)
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {name!r} was forced but {why}")
        return name
    if device.type == "cpu":
        ok, why = backend_available("cpu", device)
        if not ok:
            _warn_slow_cpu(why)
        return "cpu" if ok else "reference"
    if device.type == "cuda":
        return choose_auto_gpu(op, device)
    return "reference"


@functools.cache
def _warn_slow_cpu(why: str) -> None:
    """Once per reason: `auto` on CPU tensors runs the torch reference, many times
    slower, because the C++ kernels are not there (unless they were switched off)."""
    if os.environ.get("FASTCOMPRESS_DISABLE_CPU_EXT", "0") == "1":
        return
    warnings.warn(
        f"fastcompress: {why}; CPU tensors run on the torch reference backend (much "
        "slower). `fastcompress info` shows the build error; `fastcompress build --verbose` "
        "retries with the compiler's output",
        RuntimeWarning,
        stacklevel=4,
    )


def choose_auto_gpu(op: str, device: torch.device, available=None, verdict=None) -> str:
    """``auto`` on a GPU: the first candidate kernel for ``op`` that can run and has passed
    its parity probe on this device (probing it now if it never has); else the reference.
    ``available`` / ``verdict`` replace backend_available / _probe.verdict in tests."""
    from fastcompress import _probe

    available = available or backend_available
    verdict = verdict or _probe.verdict
    for candidate in GPU_CANDIDATES.get(op, ()):
        if available(candidate, device)[0] and verdict(candidate, op, device)["ok"]:
            return candidate
    return "reference"


def available_backends(device: torch.device) -> dict[str, str]:
    """Map every backend to ``"yes"`` or the reason it is unavailable on ``device``."""
    out = {}
    for name in BACKENDS[1:]:
        ok, why = backend_available(name, device)
        out[name] = "yes" if ok else why
    return out


def shape_fallback(name: str, backend: str | None, reason: str | None, *, op: str) -> str:
    """``name`` if its kernel takes the shape (``reason`` is None). Else: under ``auto``
    the reference (the kernel's limits are part of choosing); a forced backend raises."""
    if reason is None:
        return name
    if requested_backend(backend) == "auto":
        return "reference"
    raise BackendUnavailableError(f"{op}: backend {name!r} was forced but {reason}")
