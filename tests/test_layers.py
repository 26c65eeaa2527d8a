"""The floor plan (issue 24): every import points down the floors of ``.importlinter``
(function-level imports included), the peers stay under ``bench``, and the parts that
import-linter cannot see (the root package's ``__init__``, ``triton_kernels/`` which is
installed under ``fastcompress``) are checked here."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastcompress"
# Floors that may import the root package (whose __init__ imports every op).
TOP_FLOORS = {"cli", "__main__", "selftest", "bench", "demo", "triton_aot"}


def _lint_imports(config: pathlib.Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter", reason="import-linter is in requirements.txt")
    tool = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).parent / "lint-imports")
    return subprocess.run(
        [tool, "--config", str(config), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_import_contracts_are_kept():
    out = _lint_imports(ROOT / ".importlinter")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_the_contract_can_fail(tmp_path):
    # The same floors upside down: every real import breaks it, so the check has teeth.
    text = (ROOT / ".importlinter").read_text()
    head, layers = text.split("layers =\n", 1)
    lines, rest = [], []
    for line in layers.splitlines(keepends=True):
        (lines if line.startswith("    ") and not rest else rest).append(line)
    flipped = tmp_path / "flipped.ini"
    flipped.write_text(head + "layers =\n" + "".join(reversed(lines)) + "".join(rest))
    out = _lint_imports(flipped)
    assert out.returncode != 0 and "BROKEN" in out.stdout


def _imports(path: pathlib.Path):
    """(module imported, line) for every import statement, function level included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def test_only_the_top_floors_import_the_root_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = path.relative_to(PACKAGE).with_suffix("").parts
        if module[0] in TOP_FLOORS or module == ("__init__",):
            continue
        for name, line in _imports(path):
            if name == "fastcompress":  # `import fastcompress`: every op comes with it
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, offenders


def test_triton_kernels_stand_on_the_bottom_floor():
    # Installed as fastcompress.triton_kernels (import-linter cannot see it in a
    # checkout): the kernels may use each other and the references, nothing above.
    allowed = ("fastcompress.triton_kernels", "fastcompress.reference")
    offenders = [
        f"{path.name}:{line} imports {name}"
        for path in (ROOT / "triton_kernels").glob("*.py")
        for name, line in _imports(path)
        if name.startswith("fastcompress") and not name.startswith(allowed)
    ]
    assert not offenders, offenders


def test_import_fastcompress_leaves_the_peers_alone():
    code = (
        "import sys, fastcompress, fastcompress.nn, fastcompress.selftest\n"
        "print(sorted(m for m in ('faiss', 'vector_quantize_pytorch', 'fastcompress.peers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
