import os
import sys

# Triton kernels run on CPU tensors through the interpreter in the tests. The flag is
# read when @triton.jit decorates, so it must be set before any kernel module imports.
# (The ahead-of-time compile tests run in subprocesses without it.)
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("fastcompress.triton_kernels") is None:
    pytest.exit(
        "fastcompress is not installed from this checkout (fastcompress.triton_kernels is "
        "missing): run `make test`, or `pip install --no-build-isolation -e .` first",
        returncode=4,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ---------------------------------------------------------------- C++ ISA levels
# Every test that can reach the C++ kernels runs once per ISA level this CPU supports
# (an AVX-512 machine runs avx512, avx2 and baseline; an AVX2 one avx2 and baseline):
# tests parametrized by `backend` (their 'cpu' cases), and the modules marked
# `cpu_kernels` (all their tests). Other cases run at the best level only.
# FASTCOMPRESS_TEST_CPU_ISAS=avx512 (a comma list) runs only the C++ tests, at only those
# levels: .ci/run uses it for the emulated AVX-512 pass (FASTCOMPRESS_EMULATE_AVX512=1),
# after the other levels have run.


def _cpu_isas() -> tuple[list[str], list[str]]:
    """(the levels to test, every level this build and CPU support), best first."""
    from fastcompress import _ext

    if not _ext.load_cpu_extension(raise_on_error=False):
        return [], []
    supported = _ext.supported_cpu_isas()
    wanted = [name for name in os.environ.get("FASTCOMPRESS_TEST_CPU_ISAS", "").split(",") if name]
    if not wanted:
        return supported, supported
    unknown = [name for name in wanted if name not in supported]
    if unknown:
        raise pytest.UsageError(
            f"FASTCOMPRESS_TEST_CPU_ISAS names {unknown}, which this build and CPU lack "
            f"(supported: {supported})"
        )
    return [name for name in supported if name in wanted], supported


CPU_ISAS, _SUPPORTED_ISAS = _cpu_isas()
# A single level that is also the default (the CPU's best) needs no fixture; else every
# C++ test gets one parameter per level.
PARAMETRIZE_ISAS = len(CPU_ISAS) > 1 or CPU_ISAS[:1] != _SUPPORTED_ISAS[:1]
ONLY_CPP_TESTS = bool(os.environ.get("FASTCOMPRESS_TEST_CPU_ISAS"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_kernels: run every test at every CPU ISA level")
    config.addinivalue_line(
        "markers",
        "no_kernel: a backend-parametrised test that is refused (after choosing its backend) "
        "before any kernel runs",
    )
    config.addinivalue_line(
        "markers",
        "isa_independent: the op's cpu backend is ATen code, not the C++ kernels: one run "
        "at the CPU's best level instead of one per ISA level",
    )


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker("cpu_kernels") is not None
    independent = metafunc.definition.get_closest_marker("isa_independent") is not None
    if PARAMETRIZE_ISAS and ("backend" in metafunc.fixturenames or marked) and not independent:
        # `cpu_isa` is an autouse fixture, so it is in every test's closure and the
        # indirect parameter reaches it (a name appended to fixturenames here would not
        # be set up: every level's id then ran at the CPU's best level).
        metafunc.parametrize("cpu_isa", CPU_ISAS, indirect=True)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        isa = params.get("cpu_isa") if params else None
        marked = item.get_closest_marker("cpu_kernels") is not None
        on_cpu = marked or "cpu" in (
            (params or {}).get("backend"),
            (params or {}).get("op_backend"),
        )
        at_best = isa in (None, CPU_ISAS[0] if CPU_ISAS else None)
        (keep if on_cpu or (at_best and not ONLY_CPP_TESTS) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def cpu_isa(request):
    """The C++ kernels run at the test's parametrised ISA level (its id); after the test,
    the kernels it ran must all have run at that level, and a test parametrised with
    ``backend`` must have chosen that backend. Unparametrised tests run at the CPU's best
    level and are not checked."""
    from fastcompress import _backend, _ext

    level = getattr(request, "param", None)
    backend = getattr(getattr(request.node, "callspec", None), "params", {}).get("backend")
    chosen_before = _backend.selections.copy()
    if level is None:
        yield None
    else:
        calls_before = _ext.kernel_calls()
        with _ext.forced_cpu_isa(level):
            assert _ext.cpu_isa() == level
            yield level
        calls = {k: v - calls_before[k] for k, v in _ext.kernel_calls().items()}
        elsewhere = {k: v for k, v in calls.items() if k != level and v}
        assert not elsewhere, f"test id says {level} but kernels ran at {elsewhere}"
        if backend == "cpu" and request.node.get_closest_marker("no_kernel") is None:
            assert calls[level] > 0, f"test id says cpu/{level} but no C++ kernel ran"
    if backend in _backend.BACKENDS[1:]:
        chosen = _backend.selections - chosen_before
        assert chosen[backend] > 0, f"test id says backend {backend} but it ran {dict(chosen)}"
