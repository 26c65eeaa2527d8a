"""Input checks shared by the ops: clear errors that name the argument and the expectation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(value.shape)}"
            )
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    return value


def check_same(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
            f"move both to one device"
        )
    if value.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; they must match"
        )


def check_finite(name: str, value: Tensor) -> None:
    """Data-dependent: call inside op implementations, not in traced code.

    NaN and inf always propagate into a sum, so one reduction (1.7 ms for 8M floats)
    replaces ``isfinite(x).all()`` (34 ms: a full bool tensor); only when the sum is not
    finite (which an overflowing sum of huge finite values can also cause) is the exact
    test run."""
    if value.numel() and not bool(torch.isfinite(value.sum())):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf; the result would be garbage")


def check_finite_number(name: str, value: float) -> float:
    """A float argument (beta, a temperature, a scale) must be a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def raise_nonfinite(owner: str, named: Iterable[tuple[str, Tensor | None]]) -> NoReturn:
    """Called once a result was found not finite: raise a ValueError naming the first
    input or parameter that holds NaN or inf (checked only now, so good input pays one
    check of the small result instead of a pass over every weight)."""
    for name, value in named:
        if value is not None:
            check_finite(f"{owner}: {name}", value)
    raise ValueError(
        f"{owner}: the result is not finite although no input or parameter holds NaN or "
        "inf: float32 overflowed (inputs or weights too large)"
    )
