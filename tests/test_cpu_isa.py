"""Run-time ISA dispatch of the C++ kernels (issue 12): one library holds every level,
the CPU's best runs unless FASTCOMPRESS_CPU_ISA forces one, and nothing outside a
level's own code uses that level's instructions, so the library (ahead of time or just
in time) loads and runs on any x86-64 CPU. Parity at every level: conftest.py runs the
C++ tests once per level the machine supports."""

import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastcompress as fc
from fastcompress import _ext, bench
from fastcompress.reference import mcq_search_reference

pytestmark = pytest.mark.skipif(
    not _ext.load_cpu_extension(raise_on_error=False), reason="no C++ extension"
)
ON_X86 = platform.machine().lower() in ("x86_64", "amd64")
ON_ARM = platform.machine().lower() in ("aarch64", "arm64")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_auto_picks_the_best_level_the_cpu_has():
    supported = _ext.supported_cpu_isas()
    assert supported[-1] == "baseline" and _ext.cpu_isa() == supported[0]
    if not ON_X86:  # aarch64: one level, NEON through the compiler
        assert supported == ["baseline"]
        return
    with open("/proc/cpuinfo") as f:
        flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    want = "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else (
        "avx2" if {"avx2", "fma"} <= flags else "baseline"
    )  # fmt: skip
    if want == "avx2" and _ext.avx512_emulated():  # FASTCOMPRESS_EMULATE_AVX512=1
        want = "avx512"
    assert supported[0] == want


def test_forcing_a_level_the_cpu_lacks_or_an_unknown_one_is_an_error():
    code = (
        "import torch, fastcompress as fc; fc.mcq_search(torch.randn(4, 8), torch.randn(1, 5, 8))"
    )
    out = _run(code, FASTCOMPRESS_CPU_ISA="sse9")
    assert out.returncode != 0 and "FASTCOMPRESS_CPU_ISA must be one of" in out.stderr
    missing = [name for name in ("avx512", "avx2") if name not in _ext.supported_cpu_isas()]
    if missing:  # on an AVX-512 machine every level exists, and this part has nothing to force
        out = _run(code, FASTCOMPRESS_CPU_ISA=missing[0])
        assert out.returncode != 0 and "supports at most" in out.stderr, out.stderr[-500:]
        with pytest.raises(ValueError, match="supports at most"):
            _ext.set_cpu_isa(missing[0])
    # A forced level the CPU has is used, also under the auto backend.
    lowest = _ext.supported_cpu_isas()[-1]
    out = _run(
        "from fastcompress import _ext; _ext.load_cpu_extension(); print(_ext.cpu_isa())",
        FASTCOMPRESS_CPU_ISA=lowest,
    )
    assert out.returncode == 0 and out.stdout.strip() == lowest, out.stderr[-500:]


def test_avx512_emulation_is_a_test_build_of_its_own(monkeypatch):
    # FASTCOMPRESS_EMULATE_AVX512=1 (the avx512 level's code compiled for AVX2, for the
    # tests on CPUs without AVX-512) must never be what a user loads: its own flags, so its
    # own cache folder, and never the ahead-of-time library.
    monkeypatch.delenv("FASTCOMPRESS_EMULATE_AVX512", raising=False)
    user_flags, user_dir = _ext.jit_flags(), _ext.jit_build_dir()
    monkeypatch.setenv("FASTCOMPRESS_EMULATE_AVX512", "1")
    assert "-DFC_EMULATE_AVX512" in _ext.jit_flags()
    assert "-DFC_EMULATE_AVX512" not in user_flags
    assert _ext.jit_build_dir() != user_dir
    assert _ext._prebuilt_cpu_library() is None
    if _ext.avx512_emulated():  # this run is the emulating one: it reports so
        assert _ext.supported_cpu_isas()[0] == "avx512"
        assert bench.machine_info().get("cpu_isa_note", "").startswith("avx512 level emulated")


def test_every_level_gives_exact_indices_on_exactly_representable_data():
    z = torch.randint(-4, 5, (777, 64)).float()
    books = torch.randint(-4, 5, (8, 300, 8)).float()
    want = mcq_search_reference(z, books, False)
    for name in _ext.supported_cpu_isas():
        with _ext.forced_cpu_isa(name):
            assert torch.equal(fc.mcq_search(z, books, normalize=False, backend="cpu"), want), name


def _library() -> pathlib.Path:
    origin = pathlib.Path(_ext.cpu_origin())
    return origin if origin.is_file() else next(origin.glob("*.so"))


_ON_OLD_X86 = """
import os, torch
from fastcompress import _ext, selftest
from fastcompress.reference import mcq_search_reference
import fastcompress as fc

_ext.load_cpu_extension()
assert _ext.cpu_origin() == os.environ["WANT_ORIGIN"], (_ext.cpu_origin(), "not the same library")
assert _ext.supported_cpu_isas() == ["baseline"] and _ext.cpu_isa() == "baseline"
z, books = torch.randint(-4, 5, (333, 64)).float(), torch.randint(-4, 5, (8, 300, 8)).float()
assert torch.equal(fc.mcq_search(z, books, normalize=False, backend="cpu"),
                   mcq_search_reference(z, books, False))
for name, check in selftest.CHECKS.items():
    check("cpu", torch.device("cpu"))
print("baseline level: every check passed")
"""


def _emulated_cpu_env() -> dict[str, str]:
    """The environment of the child on the emulated qemu64 CPU: it must describe that
    CPU, not this one. Machines that pin OpenBLAS to their own core type
    (OPENBLAS_CORETYPE=Haswell on the Zen 5 hosts) would make numpy's OpenBLAS run AVX2
    code there and die with SIGILL before fastcompress loads. Prescott is OpenBLAS's
    SSE3 kernel set, which qemu64 has."""
    env = {**os.environ, "WANT_ORIGIN": _ext.cpu_origin()}
    env["OPENBLAS_CORETYPE"] = "Prescott"
    env.pop("MKL_ENABLE_INSTRUCTIONS", None)
    env.pop("ATEN_CPU_CAPABILITY", None)  # torch picks its own level from cpuid
    return env


def test_the_emulated_cpu_child_describes_the_emulated_cpu(monkeypatch):
    # Whatever this machine pins for its own CPU, the qemu64 child gets a core type the
    # emulated CPU has, and this process's environment is left as it was.
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    env = _emulated_cpu_env()
    assert env["OPENBLAS_CORETYPE"] == "Prescott" and "ATEN_CPU_CAPABILITY" not in env
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"


@pytest.mark.skipif(not ON_X86, reason="x86-64 only")
def test_the_library_runs_on_an_x86_64_cpu_without_avx():
    # The library the tests use (the ahead-of-time one in .ci/run's second stage) on an
    # emulated x86-64 CPU with SSE2 and no AVX (qemu-user's qemu64 model, which raises
    # SIGILL on any VEX instruction): it must load, pick the baseline level and pass the
    # selftest's parity checks of every op. A level's instruction leaking into shared
    # code would kill it here, as on a user's older CPU.
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("FASTCOMPRESS_REQUIRE_QEMU") == "1":
            pytest.fail("qemu-x86_64 not found: apt-get install qemu-user (.ci/run does)")
        pytest.skip("qemu-x86_64 not installed (Debian's qemu-user)")
    out = subprocess.run(
        [qemu, "-cpu", "qemu64", sys.executable, "-c", _ON_OLD_X86],
        env=_emulated_cpu_env(),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    assert "every check passed" in out.stdout


def _instructions():
    """(function, instruction) for every instruction in the library's disassembly. On an
    aarch64 machine `objdump` is native; under emulation on x86 (scripts/aarch64.sh) only
    the cross binutils read the library."""
    tool = (ON_ARM and shutil.which("aarch64-linux-gnu-objdump")) or shutil.which("objdump")
    if tool is None:
        pytest.skip("objdump (binutils) not installed")
    listing = subprocess.run(
        [tool, "-d", "-C", "--no-show-raw-insn", str(_library())],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    function = None
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2 or not re.match(r"^\s+[0-9a-f]+:$", parts[0]):
            continue
        yield function, " ".join(parts[1:])


@pytest.mark.skipif(not ON_X86, reason="x86-64 only: the AVX levels exist only there")
def test_no_avx_instruction_outside_the_avx_levels():
    # The baseline and the binding must run on a CPU without AVX: any VEX/EVEX instruction
    # (v-prefixed, ymm/zmm or mask registers) in a function outside the isa_avx2 /
    # isa_avx512 namespaces (an inline function the linker shared between levels, say)
    # would be a SIGILL there.
    offenders, vector_functions = set(), set()
    for function, instruction in _instructions():
        mnemonic = instruction.split()[0] if instruction.split() else ""
        if mnemonic.startswith("v") or re.search(r"%[yz]mm|%k[0-7]", instruction):
            if "isa_avx2::" in function or "isa_avx512::" in function:
                vector_functions.add(function)
            else:
                offenders.add(function)
    assert vector_functions, "the listing has no AVX code at all: is it parsed right?"
    assert not offenders, sorted(offenders)[:10]


@pytest.mark.skipif(not ON_ARM, reason="aarch64 only (on x86-64: scripts/aarch64.sh)")
def test_aarch64_baseline_is_neon_with_fused_multiply_add():
    # The baseline level on aarch64 is the generic 4-lane code: it must come out as NEON
    # `fmla vN.4s` in every hot kernel, not scalar code or separate multiply and add.
    fmla_per_function: dict[str, int] = {}
    for function, instruction in _instructions():
        if re.match(r"fmla\s+v\d+\.4s", instruction):
            fmla_per_function[function] = fmla_per_function.get(function, 0) + 1
    for kernel in (
        "isa_baseline::mcq_kernels::search_block<",
        "isa_baseline::context_pool_kernels::scores_and_pool(",
        "isa_baseline::context_pool_kernels::meta_context_pool(",
        "isa_baseline::decode_step_kernels::linear(",
    ):
        counts = [n for name, n in fmla_per_function.items() if kernel in name]
        assert counts and min(counts) >= 4, (kernel, counts)


def test_info_reports_the_level_and_the_cpu_features():
    out = subprocess.run(
        [sys.executable, "-m", "fastcompress", "info"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-1000:]
    assert f"cpu_isa: {_ext.cpu_isa()}" in out.stdout
    assert "cpu_simd:" in out.stdout and "cpu_isa_supported:" in out.stdout
