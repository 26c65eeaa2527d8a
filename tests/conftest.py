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


def _cpu_isas() -> list[str]:
    from fastcompress import _ext

    if not _ext.load_cpu_extension(raise_on_error=False):
        return []
    return _ext.supported_cpu_isas()


CPU_ISAS = _cpu_isas()


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_kernels: run every test at every CPU ISA level")


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker("cpu_kernels") is not None
    if len(CPU_ISAS) > 1 and ("backend" in metafunc.fixturenames or marked):
        if "cpu_isa" not in metafunc.fixturenames:
            metafunc.fixturenames.append("cpu_isa")
        metafunc.parametrize("cpu_isa", CPU_ISAS, indirect=True)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        isa = params.get("cpu_isa") if params else None
        marked = item.get_closest_marker("cpu_kernels") is not None
        on_cpu = marked or (params or {}).get("backend") == "cpu"
        (keep if isa in (None, CPU_ISAS[0] if CPU_ISAS else None) or on_cpu else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def cpu_isa(request):
    """Runs the test with the C++ kernels at the parametrized ISA level."""
    from fastcompress import _ext

    with _ext.forced_cpu_isa(request.param):
        yield request.param
