"""On-device parity probes: ``auto`` uses a GPU kernel only after it has matched the
reference on that very device.

The first time ``auto`` considers a kernel (Triton or CUDA) for a family of ops on a GPU
model, it runs a small problem through the kernel and through the reference on that
device and records the verdict in ``FASTCOMPRESS_CACHE_DIR/probes.json``, keyed by the
GPU's name, compute capability, driver, and the torch, Triton and fastcompress versions
(any of them changing probes again). Passed: ``auto`` uses the kernel. Failed: a warning
names the kernel and the error, and ``auto`` stays on the reference. ``fastcompress info``
lists the verdicts. ``FASTCOMPRESS_BACKEND`` / ``backend=`` still force a backend without
any probe.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable

import torch

# Filled by the op modules (_backend.declare_gpu_kernels): op name (as passed to
# select_backend) -> the kernel family its probe checks, and family -> its parity case.
FAMILIES: dict[str, str] = {}
CASES: dict[str, Callable] = {}

_lock = threading.Lock()
_memory: dict[tuple[str, str, str], dict] = {}


def device_key(device: torch.device) -> str:
    """What a verdict holds for: the device model and every version in the chain. Asked on
    every op call under ``auto`` on a GPU, so it is worked out (NVML, device properties)
    once per device and process."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    cached = _keys.get((device.type, index))
    if cached is None:
        cached = _keys[(device.type, index)] = _describe(device.type, index)
    return cached


_keys: dict[tuple[str, int | None], str] = {}


def _describe(kind: str, index: int | None) -> str:
    from fastcompress._version import __version__

    parts = [f"fastcompress {__version__}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if kind == "cuda":
        props = torch.cuda.get_device_properties(index)
        parts += [props.name, f"sm_{props.major}{props.minor}", f"driver {_driver()}"]
    else:
        parts.append(kind)
    return " | ".join(parts)


def _driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: the CUDA runtime version stands in
        return f"cuda {torch.version.cuda}"


def _cache_file():
    from fastcompress._ext import cache_root

    return cache_root() / "probes.json"


def load_verdicts() -> dict:
    """The recorded verdicts; a file that another user could have written is ignored
    (a forged 'ok' would let ``auto`` use a kernel that was never checked here)."""
    from fastcompress import _cache

    path = _cache_file()
    why = _cache.unsafe_reason(path)
    if why:
        warnings.warn(f"fastcompress: ignoring {path}: {why}", RuntimeWarning, stacklevel=2)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(key: str, backend: str, family: str, verdict: dict) -> None:
    """Record a verdict for later processes; a cache that cannot be written only costs
    a probe per process (warned once), never the op."""
    from filelock import FileLock

    path = _cache_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", mode=0o600):
            data = load_verdicts()
            data.setdefault(key, {})[f"{backend}/{family}"] = verdict
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
            temporary.chmod(0o600)
            temporary.replace(path)  # atomic: a reader never sees half a file
    except OSError as exc:
        warnings.warn(
            f"fastcompress: could not record the probe verdict in {path}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )


def verdict(backend: str, op: str, device: torch.device, run_probe: Callable | None = None) -> dict:
    """{"ok": bool, "error": str, ...} for ``backend``'s kernel of ``op`` on ``device``,
    probing (and recording) it the first time. ``run_probe(backend, family, device)``
    returns the probe's measurements or raises; the default runs the real probes."""
    family = FAMILIES.get(op, op)
    key = device_key(device)
    with _lock:
        if (key, backend, family) in _memory:
            return _memory[(key, backend, family)]
        stored = load_verdicts().get(key, {}).get(f"{backend}/{family}")
        if stored is None:
            try:
                measured = (run_probe or run_parity_probe)(backend, family, device)
                stored = {"ok": True, "error": "", **measured}
            except Exception as exc:  # the verdict, not a crash: auto falls back
                stored = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            _save(key, backend, family, stored)
        if not stored["ok"]:
            warnings.warn(
                f"fastcompress: the {backend} kernel for {family} failed its parity probe on "
                f"{key}: {stored['error']}; 'auto' uses the torch reference for it",
                RuntimeWarning,
                stacklevel=3,
            )
        _memory[(key, backend, family)] = stored
        return stored


def clear_memory() -> None:
    """Forget the verdicts read in this process (the file stays)."""
    with _lock:
        _memory.clear()


def run_parity_probe(backend: str, family: str, device: torch.device) -> dict:
    """Run ``family``'s parity case (its op module's, ``CASES``) on ``backend`` and the
    reference on ``device``; it raises AssertionError (with the error) when they disagree."""
    case = CASES.get(family)
    if case is None:
        raise AssertionError(f"no parity case is declared for the {family} kernels")
    return case(backend, device)
