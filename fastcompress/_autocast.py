"""float32 under ``torch.autocast``.

Nearest-code search, the entropy loss and the softmax statistics of the attention ops lose
what they exist for in bf16 (a bf16 entropy loss moved the codebook gradients by 14 %
relative; a bf16 search picks other codes). UniTok runs its quantizer in float32 inside
autocast regions, so every fastcompress op follows autocast's float32 policy, like
``softmax`` or ``layer_norm`` do: half-precision floating inputs are cast to float32 and
the op runs with autocast off, so the outputs are float32. ``decode_attention`` is the
exception: its caches are written in place and keep their dtype, the new ``q, k, v`` are
cast to it (its kernels accumulate in float32 either way).

Two layers: the public functionals (the torch code around the ops, e.g. the query
folding of ``compress``, runs under autocast too) and the ops themselves (for direct
``torch.ops.fastcompress.*`` calls and traced graphs), each with an ``Autocast<Device>``
kernel.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
AUTOCAST_DEVICES = tuple(AUTOCAST_KEYS)
_HALF = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    if device_type not in AUTOCAST_DEVICES:
        return False
    return torch.is_autocast_enabled(device_type)


def to_float32(value: Any) -> Any:
    """Half-precision tensors (also inside lists and tuples) to float32; the rest as is."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(item) for item in value)
    return value


def _device_type(args: tuple, kwargs: dict) -> str | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            return value[0].device.type
    return None


def float32_under_autocast(fn: Callable | None = None, *, keep: tuple[str, ...] = ()):
    """Decorator for a public functional: inside an autocast region of its inputs' device
    it runs on float32 inputs with autocast off; outside, it is called unchanged. The
    arguments named in ``keep`` (tensors written in place) are passed as they are."""
    if fn is None:
        return functools.partial(float32_under_autocast, keep=keep)
    signature = inspect.signature(fn) if keep else None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _device_type(args, kwargs)
        if device_type is None or not autocast_enabled(device_type):
            return fn(*args, **kwargs)
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            for name, value in bound.arguments.items():
                if name not in keep:
                    bound.arguments[name] = to_float32(value)
            args, kwargs = bound.args, bound.kwargs
        else:
            args, kwargs = to_float32(args), {k: to_float32(v) for k, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def register_float32_autocast(
    lib: torch.library.Library, name: str, cast: Callable[[tuple], tuple] = to_float32
) -> None:
    """``Autocast<Device>`` kernels for ``fastcompress::<name>``: cast the arguments
    (``cast``, default: half-precision tensors to float32) and call the op with autocast
    off, which dispatches on past the autocast key."""
    op = getattr(torch.ops.fastcompress, name).default
    for device_type in AUTOCAST_DEVICES:

        def kernel(*args, _device_type=device_type):
            with torch.autocast(_device_type, enabled=False):
                return op(*cast(args))

        lib.impl(name, kernel, AUTOCAST_KEYS[device_type])


def without_autocast(fn: Callable) -> Callable:
    """For the registered backward functions: a backward called inside an autocast region
    (``torch.autograd.grad`` within ``with torch.autocast(...)``) stays in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with (
            torch.autocast("cpu", enabled=False),
            torch.autocast("cuda", enabled=False),
        ):
            return fn(*args, **kwargs)

    return wrapper
