"""Shared pieces of the property-based tests (hypothesis): profiles, the backends and ISA
levels each op runs on, tensors in every layout, defects, and the rule that an example
ends either in a result that matches a float64 oracle or in a clear error naming the
argument.

Profiles (``FASTCOMPRESS_FUZZ_PROFILE``): ``ci`` (default: derandomised, about 5,000
examples in all, about two minutes on 2 cores) and ``long``
(random seeds, about 17,000 examples; what a fuzz campaign runs)."""

from __future__ import annotations

import os
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from conftest import CPU_ISAS
from hypothesis import HealthCheck, given, settings
from sandbox import BackendUnavailable

from fastcompress._backend import triton_available

PROFILE = os.environ.get("FASTCOMPRESS_FUZZ_PROFILE", "ci")
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile(PROFILE)
# Examples per case: the numbers in the tests times this (ci: ~5,000 in all).
SCALE = 10 if PROFILE == "long" else 3


def cases(with_levels: bool = True) -> list:
    """(backend, ISA level) pairs: the reference, the C++ backend at every level this
    run tests (``with_levels``; else its best level only), Triton under its interpreter."""
    levels = CPU_ISAS if with_levels else CPU_ISAS[:1]
    out = [pytest.param("reference", None, id="reference")]
    out += [pytest.param("cpu", level, id=f"cpu-{level}") for level in levels]
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(pytest.param("triton", None, id="triton"))
    return out


def run(body: Callable, backend: str, examples: int) -> None:
    """Run ``body(data)`` as a hypothesis test of ``examples`` examples (fewer for the
    interpreted Triton kernels, which take seconds each)."""
    count = max(2, examples // 5) if backend == "triton" else examples
    ran = [0]

    @settings(max_examples=count * SCALE)
    @given(data=st.data())
    def inner(data):
        ran[0] += 1
        body(data)

    inner()
    log = os.environ.get("FASTCOMPRESS_FUZZ_LOG")  # a campaign's example count
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} {ran[0]}\n")


def check_report(report: dict, backend: str, level: str | None, ran_kernel: bool) -> None:
    """The child ran what the case names: the backend it chose and, on the C++ backend,
    kernels at the case's ISA level and no other."""
    assert report["chosen"].get(backend, 0) > 0, (backend, report)
    if backend == "cpu" and level is not None:
        assert report["level"] == level, report
        elsewhere = {k: v for k, v in report["calls"].items() if k != level and v}
        assert not elsewhere, (level, report)
        if ran_kernel:
            assert report["calls"][level] > 0, (level, report)


# ---------------------------------------------------------------------------- tensors

LAYOUTS = ("contiguous", "strided", "transposed", "offset", "expanded")


def tensor(data, shape, dtype=torch.float32, layouts=LAYOUTS, scale=None) -> torch.Tensor:
    """Fresh random values (never zeros) of ``shape`` in one of ``layouts``."""
    layout = data.draw(st.sampled_from(layouts), label="layout")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    if scale is None:
        scale = data.draw(st.sampled_from([1.0, 0.1, 10.0]), label="scale")
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)

    def fresh(size):
        return (torch.randn(size, generator=gen) * scale).to(dtype)

    if layout == "strided" and shape:
        return fresh((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        return fresh((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "offset" and shape:
        return fresh((*shape[:-1], shape[-1] + 3))[..., 3:]
    if layout == "expanded" and shape and shape[0] > 1:
        return fresh((1, *shape[1:])).expand(shape)
    return fresh(shape)


# ---------------------------------------------------------------------------- defects


def inject(data, args: dict, candidates: dict[str, tuple[str, ...]]):
    """Maybe spoil one argument: ``candidates`` maps an argument to the defects it may
    get. Returns ``(name, defect)`` or None (no defect, in about half the examples)."""
    options = [(name, kind) for name, kinds in candidates.items() for kind in kinds]
    if not options or data.draw(st.booleans(), label="clean"):
        return None
    name, kind = data.draw(st.sampled_from(options), label="defect")
    value = args[name]
    if kind in ("nan", "inf"):
        if value.numel() == 0:
            return None
        spoiled = value.clone()
        flat = spoiled.view(-1) if spoiled.is_contiguous() else None
        bad = float("nan") if kind == "nan" else float("inf")
        if flat is None:
            spoiled = spoiled.contiguous()
            flat = spoiled.view(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="where")] = bad
        args[name] = spoiled
    elif kind == "int":
        args[name] = value.to(torch.int32)
    elif kind == "float64":
        args[name] = value.double()
    elif kind == "rank":
        args[name] = value.unsqueeze(0)
    elif kind == "device":
        args[name] = value.to("meta")
    return name, kind


def expect_clear_error(call: Callable, defect: tuple[str, str], backend: str):
    """The spoiled call must raise a ValueError / TypeError that names the argument."""
    name, kind = defect
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    assert name in str(caught.value), (defect, str(caught.value))


def outcome(call: Callable, backend: str):
    """``call()``'s result, or None when a forced Triton kernel refuses the shape (its
    documented limits: a BackendUnavailableError naming the reason)."""
    try:
        return call()
    except BackendUnavailable:
        if backend != "triton":
            raise
        return None


# ---------------------------------------------------------------------------- tolerance

# Kernel against the float64 oracle: float32 math throughout, half types one rounding
# of the float32 result (and half inputs already rounded before either saw them).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), atol=tol["atol"] * scale, rtol=tol["rtol"]
    )


def within_torch(
    got, want, yardsticks, dtype: torch.dtype, scale: float = 1.0, what: str = "",
    slack: float = 1e-5, magnitude: float | None = None, factor: float = 2.0,
    target: float | None = None,
) -> None:  # fmt: skip
    """FlashAttention's rule: the error against the float64 oracle is at most twice the
    error of torch computing the same thing in the same precision, plus one rounding of
    the result to ``dtype`` and ``slack * scale``. ``yardsticks`` are torch's results
    (None entries are skipped): one float32 evaluation can be exact by luck, and two
    float32 summation orders differ by 10x on a saturated softmax, so the worst of them
    is the yardstick. Without any, the fixed tolerance of ``dtype``. ``magnitude``: the
    size of what is rounded to ``dtype`` when that is more than the result (autograd adds
    two bf16 gradients of size 1 into one of size 0.01: each is rounded first).
    ``target``: an absolute accuracy (relative to ``scale``) that passes by itself, the
    issue's own criterion where it states one (the entropy loss: 1e-5 for the loss, 1e-4
    for the gradients), whatever torch's luck on the example."""
    yardsticks = [
        y for y in (yardsticks if isinstance(yardsticks, list) else [yardsticks]) if y is not None
    ]
    if not yardsticks:
        return close(got, want, dtype, scale)
    if want.numel() == 0:
        return
    err = float((got.double() - want.double()).abs().max())
    if target is not None and err <= target * scale:
        return
    torch_err = max(float((y.detach().double() - want.double()).abs().max()) for y in yardsticks)
    size = float(want.double().abs().max()) if magnitude is None else magnitude
    one_rounding = 2 * torch.finfo(dtype).eps * size
    assert err <= factor * torch_err + one_rounding + slack * scale, (what, err, torch_err, dtype)
