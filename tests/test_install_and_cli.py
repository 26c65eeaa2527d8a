"""What a new user meets first: the install (wheel contents, metadata, the Makefile's
install check), the command line, the benchmark report and the demo report."""

import io
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch

import fastcompress as fc
from fastcompress import bench, cli
from fastcompress._progress import progress
from fastcompress.demo import codes_used_per_codebook
from fastcompress.reference import mcq_search_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import install_env  # noqa: E402


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "FASTCOMPRESS_AOT": "0"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, env=env, timeout=300, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("fastcompress-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_is_pure_python_and_ships_the_sources(wheel):
    names = set(wheel.namelist())
    for needed in (
        "fastcompress/__main__.py",
        "fastcompress/triton_kernels/mcq.py",
        "fastcompress/_csrc/cpu/ops.cpp",
        "fastcompress/_csrc/cpu/isa_avx2.cpp",
        "fastcompress/_csrc/cpu/mcq_kernels.inc",
        "fastcompress/_csrc/include/fastcompress/simd.h",
        "fastcompress/_csrc/cuda/mcq_search.cu",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert any(n.endswith("-none-any.whl") or "py3-none-any" in n for n in [wheel.filename])


def test_wheel_metadata_declares_a_torch_range_never_a_pin(wheel):
    meta = next(n for n in wheel.namelist() if n.endswith("METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in wheel.read(meta).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    torch_req = [r for r in requires if r.startswith("torch")]
    assert torch_req == ["torch>=2.4"], requires
    # The Triton 3.6 interpreter needs numpy < 2.4: the extras say so.
    assert any(r.startswith("numpy<2.4") and "triton" in r for r in requires), requires


def test_requirements_never_name_torch_or_triton():
    lines = [
        line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    names = {line.split("=")[0].split("<")[0].split(">")[0] for line in lines if line}
    assert not names & {"torch", "triton"}, names


def test_build_system_is_declared_without_torch():
    # pyproject.toml makes every pip take PEP 517/660 (pip 23's legacy `setup.py develop`
    # hands -e to a nested pip that drops --no-build-isolation), and an isolated build must
    # never resolve a second torch.
    import tomllib

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert not [r for r in build["requires"] if r.lower().startswith(("torch", "triton"))]


def test_ahead_of_time_build_without_torch_says_what_to_do(tmp_path):
    # Run setup.py as an isolated build would, in an interpreter where torch cannot import.
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('no torch in this environment')")
    env = {**os.environ, "FASTCOMPRESS_AOT": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--name"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "torch" in out.stderr, out.stderr


def test_install_check_looks_from_outside_the_checkout():
    # Run from the repo root, a plain `import fastcompress` always finds ./fastcompress;
    # the check must see what the environment really has installed.
    where = install_env._probe("import os; print(os.getcwd())").stdout.strip()
    assert not where.startswith(str(ROOT))
    assert install_env.installed_checkout() == str((ROOT / "fastcompress").resolve())


def test_python_dash_m_and_help_are_clean():
    out = subprocess.run(
        [sys.executable, "-m", "fastcompress", "--help"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0 and "demo" in out.stdout
    assert "``" not in out.stdout


def test_every_cli_option_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"fastcompress {name} {action.option_strings} has no help"


def test_progress_writes_lines_not_carriage_returns_to_a_log():
    log = io.StringIO()  # not a tty
    items = list(progress(range(1000), desc="train", unit="step", file=log, postfix=lambda: "x"))
    assert items == list(range(1000))
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") == 10 and len(text) < 1000
    assert text.splitlines()[-1].startswith("train: 1000/1000 step")


def test_bench_report_records_isa_commit_and_date():
    info = bench.machine_info()
    assert info["date_utc"][:2] == "20" and info["commit"]
    if os.path.exists("/proc/cpuinfo"):
        assert info["cpu_simd"], "no SIMD flags read from /proc/cpuinfo"


def test_peak_memory_counts_a_repeated_call():
    def allocate():
        a = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(a[::4096].sum())

    first = bench._peak_memory_mb(allocate, torch.device("cpu"))
    second = bench._peak_memory_mb(allocate, torch.device("cpu"))
    assert first is not None and second is not None
    assert first >= 56 and second >= 56, (first, second)


def test_vector_quantize_pytorch_is_opt_in():
    z, books = bench.make_mcq_inputs("mgvq", 64)
    assert "vector-quantize-pytorch" not in bench.mcq_search_impls(z, books)
    assert "faiss-cpu PQ" not in bench.mcq_search_impls(z, books, peers="none")
    with pytest.raises(ValueError, match="peers must be"):
        bench.mcq_search_impls(z, books, peers=True)


def test_the_cli_benchmark_shows_every_cpu_level_side_by_side():
    # `fastcompress bench` on CPU: the level in use as fastcompress[cpu], each lower level
    # this CPU has as fastcompress[cpu:<level>], all with exact indices, and the level in
    # use restored afterwards.
    from fastcompress import _ext

    if not _ext.load_cpu_extension(raise_on_error=False):
        pytest.skip("no C++ extension")
    before = _ext.cpu_isa()
    z, books = bench.make_mcq_inputs("mgvq", 257)
    impls = bench.mcq_search_impls(z, books, peers="none")
    lower = _ext.supported_cpu_isas()[1:]
    ours = ["fastcompress[cpu]", *(f"fastcompress[cpu:{name}]" for name in lower)]
    assert set(ours) <= set(impls)
    want = mcq_search_reference(z, books)
    for name in ours:
        fn, x = impls[name]
        assert bench.index_parity(fn(x), want, z, books) == "exact", name
        assert _ext.cpu_isa() == before


def test_codes_used_is_per_codebook():
    idx = torch.tensor([[0, 5], [0, 6], [1, 7], [1, 7]])  # (N, G=2)
    assert codes_used_per_codebook(idx) == [2, 3]


@pytest.mark.parametrize("normalize", [True, False])
def test_dequantize_gives_back_z_q_with_the_same_normalize(normalize):
    z = torch.randn(2, 10, 32)
    books = torch.randn(8, 64, 4)
    out = fc.mcq_quantize(z, books, normalize=normalize)
    back = fc.mcq_dequantize(out.indices, books, normalize=normalize)
    torch.testing.assert_close(back, out.z_q.detach(), atol=2e-6, rtol=1e-5)


def test_error_messages_name_what_the_user_passed():
    with pytest.raises(ValueError, match=r"channel_dim=-1 \(its dim 1\)"):
        fc.mcq_quantize(torch.randn(5, 30), torch.randn(8, 16, 4))
    dim = 16
    queries = torch.randn(1, 4, dim)  # a (1, N_g, d) parameter
    w_in, w_out = torch.randn(3 * dim, dim), torch.randn(dim, dim)
    with pytest.raises(ValueError, match=r"2-D \(N_g, d=16\).*queries\[0\]"):
        fc.compress(torch.randn(1, 16, dim), (4, 4), 2, queries, w_in, None, w_out, None, 2)


def test_an_ahead_of_time_library_is_used_only_while_its_key_matches(tmp_path, monkeypatch):
    import importlib.util
    import types

    from fastcompress import _build, _ext

    want = _build.build_key(_build.CPU_CFLAGS, torch.__version__)
    library = tmp_path / "_C_cpu.so"
    spec = types.SimpleNamespace(origin=str(library))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    _ext.load_cpu_extension()
    origin = pathlib.Path(_ext.cpu_origin())  # the AOT library, or the JIT build's folder
    elf = (origin if origin.is_file() else next(origin.glob("*.so"))).read_bytes()
    # An AOT library (CI's second stage) carries its own key: blank it, same length, so
    # that the key this test appends is the one found.
    elf = elf.replace(b"FASTCOMPRESS_BUILD_KEY=", b"FASTCOMPRESS_BUILD_KE_=")
    library.write_bytes(elf + b"FASTCOMPRESS_BUILD_KEY=" + want.encode() + b"\0")
    assert _build.library_build_key(str(library)) == want
    assert _ext._prebuilt_cpu_library() == str(library)
    library.write_bytes(elf[: len(elf) // 2] + b"FASTCOMPRESS_BUILD_KEY=" + want.encode())
    assert _ext._prebuilt_cpu_library() is None  # truncated: never loaded (SIGBUS)
    library.write_bytes(elf + b"FASTCOMPRESS_BUILD_KEY=0123456789abcdef\0")  # other sources
    assert _ext._prebuilt_cpu_library() is None
    library.write_bytes(elf)  # built before keys existed
    assert _ext._prebuilt_cpu_library() is None
