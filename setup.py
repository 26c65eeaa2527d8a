"""Install: ``pip install .`` (or ``-e .``), with or without build isolation.

By default this is a pure-Python install: nothing is compiled and torch is not imported,
so build isolation cannot drag in a second torch. The C++ CPU extension is built just in
time on first use, for the user's own torch and CPU (``fastcompress build`` does it
eagerly), from the sources shipped inside the package (``fastcompress/_csrc``).

``FASTCOMPRESS_AOT=1`` builds it ahead of time instead, against the torch that is already
installed (so use ``--no-build-isolation``), and the CUDA extension as well where that
torch has CUDA and nvcc is present. Either way every CPU ISA level is compiled into the
one extension and chosen at run time: no ``-march=native`` binary is ever shipped.
"""

import os

from setuptools import setup

PACKAGES = ["fastcompress", "fastcompress.reference", "fastcompress.nn"]
PACKAGE_DIR = {"fastcompress.triton_kernels": "triton_kernels", "fastcompress._csrc": "csrc"}
CSRC_DATA = ["include/fastcompress/*", "cpu/*.cpp", "cpu/*.h", "cpu/*.inc", "cuda/*"]


def _ahead_of_time():
    """ext_modules and cmdclass of the optional ahead-of-time build."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "FASTCOMPRESS_AOT=1 builds against the torch already installed, and this build "
            "environment has none: install torch first and add --no-build-isolation "
            "(e.g. FASTCOMPRESS_AOT=1 pip install --no-build-isolation .)"
        ) from exc
    from fastcompress import _build

    return _build.setup_extensions()


ext_modules, cmdclass = ([], {})
if os.environ.get("FASTCOMPRESS_AOT", "0") == "1":
    ext_modules, cmdclass = _ahead_of_time()

setup(
    name="fastcompress",
    version="0.1.0",
    description="Fused kernels for visual-token compression in unified multimodal models",
    packages=PACKAGES + list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"fastcompress._csrc": CSRC_DATA},
    python_requires=">=3.10",
    # A range, never a pin: an installed torch inside it is kept as it is. 2.4 is the
    # oldest torch with torch.library.custom_op / register_fake / register_autograd.
    install_requires=["torch>=2.4", "tqdm", "filelock", "ninja"],
    extras_require={
        # The Triton 3.6 interpreter (TRITON_INTERPRET=1) breaks on numpy 2.4.
        "triton": ["triton>=3.2", "numpy<2.4"],
        "bench": ["pytest-benchmark", "matplotlib", "nvidia-ml-py", "faiss-cpu"],
        "plots": ["matplotlib"],
        "test": ["pytest", "hypothesis", "import-linter", "numpy<2.4"],
    },
    entry_points={"console_scripts": ["fastcompress=fastcompress.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
