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
