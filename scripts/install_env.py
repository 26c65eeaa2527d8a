"""`make install`: bring the running Python's environment up to what the README's
commands need, touching only what is missing or wrong.

1. torch: a torch that is already there and inside the supported range is kept (a user's
   CUDA build included). With none, torch==2.13.0 is installed (a CPU build; on this
   project's machines it lies on disk). A torch older than the range stops with a message
   rather than being replaced.
2. Triton (``test`` and ``bench``): kept when present (a CUDA torch pins its own); else
   the tested 3.6.0.
3. The requirements of the command (``main``, ``test`` or ``bench``: requirements*.txt,
   never torch or Triton).
4. fastcompress itself, editable, whenever the package that Python imports *from outside
   this checkout* is not this checkout (missing, an older clone, a non-editable copy).
   Checking from the repo root would always see the local ``./fastcompress`` folder.

Runs with the standard library only, so it works before anything is installed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_MIN = (2, 4)  # torch.library.custom_op / register_fake / register_autograd / opcheck
TORCH_DEFAULT = "torch==2.13.0"
TRITON_DEFAULT = "triton==3.6.0"


def _probe(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in this Python from a folder outside the checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            [sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True
        )


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_torch() -> None:
    found = _probe("import torch; print(torch.__version__)")
    if found.returncode != 0:
        _pip(TORCH_DEFAULT)
        return
    version = found.stdout.strip()
    major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
    if (major, minor) < TORCH_MIN:
        sys.exit(
            f"torch {version} is older than the supported {'.'.join(map(str, TORCH_MIN))}: "
            "upgrade it yourself (fastcompress never replaces your torch)"
        )
    print(f"torch {version}: kept")


def ensure_triton() -> None:
    if _probe("import triton").returncode != 0:
        _pip(TRITON_DEFAULT)


def installed_checkout() -> str | None:
    """Folder of the ``fastcompress`` package that Python imports outside the checkout,
    or None when it is missing or incomplete (no ``fastcompress.triton_kernels``)."""
    found = _probe(
        "import fastcompress, fastcompress.triton_kernels, os; "
        "print(os.path.realpath(fastcompress.__path__[0]))"
    )
    return found.stdout.strip() if found.returncode == 0 else None


def ensure_package() -> None:
    here = str((ROOT / "fastcompress").resolve())
    where = installed_checkout()
    if where == here:
        return
    print(f"fastcompress: installed copy is {where or 'missing'}, installing this checkout")
    _pip("--no-build-isolation", "--no-deps", "-e", ".")
    where = installed_checkout()
    if where != here:
        sys.exit(f"fastcompress still imports from {where} after the install, not {here}")


# What each command needs beyond torch and fastcompress: `make main` only the main job's
# (the demo); `make test` adds the test stack (Triton's interpreter runs the GPU kernels
# on CPU tensors); `make bench` adds the peers and the benchmark harness.
STACKS = {
    "main": ("requirements.txt",),
    "test": ("requirements.txt", "requirements-test.txt"),
    "bench": ("requirements.txt", "requirements-test.txt", "requirements-bench.txt"),
}


def main(argv: list[str]) -> None:
    stack = argv[0] if argv else "test"
    if stack not in STACKS:
        sys.exit(f"usage: install_env.py [{' | '.join(STACKS)}], got {stack!r}")
    ensure_torch()
    if stack != "main":
        ensure_triton()
    for requirements in STACKS[stack]:
        _pip("-r", requirements)
    ensure_package()


if __name__ == "__main__":
    main(sys.argv[1:])
