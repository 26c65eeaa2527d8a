"""GPU kernels compiled for real (no GPU needed): Triton ahead of time for sm_80/sm_90,
the CUDA sources with nvcc. The interpreter tests cannot see spills or MMA limits."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(scope="module")
def triton_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fastcompress.triton_aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_triton_config_compiles_for_sm80_and_sm90(triton_report):
    from fastcompress.triton_aot import kernel_configs

    names = {name for name, *_ in kernel_configs()}
    seen = {(row["kernel"], row["target"]) for row in triton_report}
    assert seen == {(n, t) for n in names for t in ("sm_80", "sm_90")}


# Benchmark shapes must not spill at all. The corners of what each launcher accepts
# (largest and smallest bands, most query rows; see triton_aot.kernel_configs) are held
# to a few registers' worth: before the launch tables took M and the band into account
# they spilled 0.4-4 KiB there.
CORNER_SPILL_BYTES = 64


def test_triton_kernels_do_not_spill(triton_report):
    # The launch tables are tuned with Triton 3.6, the GPU machines' version, and the
    # limits hold there (CI's first venv). Another Triton allocates registers differently:
    # 3.8, beside torch 2.14.1 in CI's second venv, spilled 1.7 KiB at the compressor's
    # d = 256 fp32 shape on sm_80 (benchmarks/NOTES.md section 6). There the spills are
    # listed, and only registers and shared memory are asserted.
    import triton

    tuned = triton.__version__.startswith("3.6")
    spilled = []
    for row in triton_report:
        print(row)
        limit = CORNER_SPILL_BYTES if row["kernel"].endswith(" corner") else 0
        if row["spill_stores"] > limit or row["spill_loads"] > limit:
            spilled.append(row)
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["target"]], row
    if tuned:
        assert not spilled, spilled
    elif spilled:
        names = sorted({f"{r['kernel']} {r['target']}: {r['spill_stores']} B" for r in spilled})
        warnings.warn(
            f"Triton {triton.__version__} (tables tuned on 3.6) spills: {names}", stacklevel=1
        )


def test_triton_corners_are_compile_checked(triton_report):
    corners = [row["kernel"] for row in triton_report if row["kernel"].endswith(" corner")]
    assert any(k.startswith("meta_context_pool") for k in corners)
    assert any(k.startswith("decode_attention") for k in corners)


def _nvcc():
    """nvcc, or a skip where there is none (a user's CPU machine). The project's own CI
    sets FASTCOMPRESS_REQUIRE_NVCC=1: there a missing nvcc fails instead of skipping."""
    path = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(path):
        if os.environ.get("FASTCOMPRESS_REQUIRE_NVCC", "0") == "1":
            pytest.fail("nvcc not found, and FASTCOMPRESS_REQUIRE_NVCC=1 (the project's CI)")
        pytest.skip("nvcc not found: the CUDA sources cannot be compile-checked here")
    return path


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(tmp_path, source, arch):
    out = subprocess.run(
        [
            _nvcc(),
            f"-arch={arch}",
            "-c",
            "--resource-usage",
            "-O3",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(source),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    usage = out.stdout + out.stderr
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", usage)]
    assert registers and max(registers) <= 255
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill", usage)]
    assert sum(spills) == 0, usage


def test_shared_header_is_framework_free(tmp_path):
    src = tmp_path / "use.cpp"
    src.write_text(
        '#include "fastcompress/mcq_tile.cuh"\n'
        "int main() { float z[2] = {3, 4}, y[2]; fastcompress::normalize_chunk(z, y, 2);"
        " return y[0] == 0.6f ? 0 : 1; }\n"
    )
    exe = tmp_path / "use"
    subprocess.run(
        ["c++", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", str(src), "-o", str(exe)],
        check=True,
        timeout=120,
    )
    assert subprocess.run([str(exe)]).returncode == 0
