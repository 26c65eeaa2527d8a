"""Build: pip install --no-build-isolation --no-deps -e .

Build isolation would pull a CUDA torch and a conflicting Triton from the registry, so
the build uses the torch already installed. The CPU extension is built when a C++
compiler is present; the CUDA extension only when the installed torch has CUDA
(``CUDAExtension`` cannot build against the CPU torch). Without either, the package
still installs and runs on the torch reference.
"""

import os
import shutil

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTCOMPRESS_NO_EXT", "0") != "1" and shutil.which("c++"):
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    include = [os.path.abspath("csrc/include")]
    ext_modules.append(
        CppExtension(
            "fastcompress._C_cpu",
            [
                "csrc/cpu/mcq_cpu.cpp",
                "csrc/cpu/decode_step_cpu.cpp",
                "csrc/cpu/context_pool_cpu.cpp",
            ],
            include_dirs=include,
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            extra_link_args=["-fopenmp"],
        )
    )
    if torch.version.cuda is not None and shutil.which("nvcc"):
        ext_modules.append(
            CUDAExtension(
                "fastcompress._C_cuda",
                ["csrc/cuda/mcq_binding.cpp", "csrc/cuda/mcq_search.cu"],
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="fastcompress",
    version="0.1.0",
    description="Fused kernels for visual-token compression in unified multimodal models",
    packages=[
        "fastcompress",
        "fastcompress.reference",
        "fastcompress.nn",
        "fastcompress.triton_kernels",
    ],
    package_dir={"fastcompress.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    # torch is deliberately not listed: any spec here would let pip replace the CPU build
    # with a CUDA one. Install torch first (see README).
    install_requires=["numpy", "tqdm", "filelock"],
    extras_require={
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "matplotlib", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["fastcompress=fastcompress.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
