"""First use (issue 22): what a new user sees in the first minutes. The build says
whether it built or loaded; a failed build warns once and the library still answers;
`--device cuda` on a machine without CUDA is one line and exit status 2; a channel-first
tensor gets the channel_dim hint; the benchmark names noisy rounds, a loaded machine and
missing extras; the demo explains its yardstick."""

import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
from cache_entries import cache_env, seed

import fastcompress as fc
from fastcompress import _ext, bench, cli
from fastcompress.demo import format_report, run_demo
from fastcompress.pipeline import StackConfig
from fastcompress.reference import mcq_search_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _fastcompress(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "fastcompress", *args],
        capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy(),
    )  # fmt: skip


def _private_cache(tmp_path: pathlib.Path) -> dict[str, str]:
    tmp_path.chmod(0o700)
    (tmp_path / "xdg").mkdir(mode=0o700)
    return cache_env(tmp_path / "cache", tmp_path / "xdg")


def test_build_says_it_loaded_a_cached_library(tmp_path):
    if not _ext.load_cpu_extension(raise_on_error=False):
        pytest.skip("no C++ extension")
    env = _private_cache(tmp_path)
    folder = seed(pathlib.Path(env["FASTCOMPRESS_CACHE_DIR"]))
    out = _fastcompress("build", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "C++ CPU extension loaded (already built)" in out.stdout, out.stdout
    assert str(folder) in out.stdout and "building" not in out.stderr


@pytest.mark.parametrize("built", [True, False])
def test_build_wording_follows_whether_this_process_built(monkeypatch, capsys, built):
    monkeypatch.setattr(_ext, "load_cpu_extension", lambda **_: True)
    monkeypatch.setattr(_ext, "built_now", lambda: built)
    assert cli.cmd_build(types.SimpleNamespace(verbose=False)) == 0
    said = capsys.readouterr().out
    assert ("C++ CPU extension built in" in said) == built
    assert ("loaded (already built)" in said) == (not built)


# A C++ build that fails (here: a compiler that always fails). `auto` must warn once, name
# the reason and the way out, and still give the reference's answer.
FAILED_BUILD_CHILD = """
import warnings, torch, fastcompress as fc
from fastcompress import _backend
from fastcompress.reference import mcq_search_reference
z, books = torch.randn(40, 16), torch.randn(2, 30, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = fc.mcq_search(z, books)
    second = fc.mcq_search(z, books)
assert torch.equal(first, mcq_search_reference(z, books)) and torch.equal(first, second)
slow = [str(w.message) for w in caught if "reference backend" in str(w.message)]
print("WARNINGS", len(slow))
print("MESSAGE", slow[0] if slow else "")
print("BACKEND", _backend.select_backend(z.device, None, op="mcq_search"))
"""


def test_a_failed_cpu_build_warns_once_and_the_reference_answers(tmp_path):
    env = {**_private_cache(tmp_path), "CXX": "/bin/false", "CC": "/bin/false"}
    env.pop("FASTCOMPRESS_DISABLE_CPU_EXT", None)
    env.pop("FASTCOMPRESS_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", FAILED_BUILD_CHILD],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["WARNINGS"] == "1", out.stdout
    assert "CPU tensors run on the torch reference backend" in lines["MESSAGE"]
    assert "fastcompress build --verbose" in lines["MESSAGE"]
    assert lines["BACKEND"] == "reference"


@pytest.mark.parametrize("command", ["selftest", "bench"])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(command, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _fastcompress(command, "--device", "cuda", "--out", str(tmp_path), timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    said = out.stderr.strip().splitlines()
    assert len(said) == 1 and "torch sees no CUDA device" in said[0], out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir())


def test_channel_first_input_gets_the_channel_dim_hint():
    books = torch.randn(2, 16, 8)
    z = torch.randn(2, 16, 5, 7)  # (B, C, H, W), C = G*d on dim 1, not on the last dim
    with pytest.raises(ValueError, match="for channel-first .* pass channel_dim=1"):
        fc.mcq_search(z, books)
    idx = fc.mcq_search(z, books, channel_dim=1)
    rows = z.movedim(1, -1).reshape(-1, 16)
    assert torch.equal(idx.reshape(-1, 2), mcq_search_reference(rows, books))
    # Not channel-first (C = G*d nowhere): no hint that would mislead.
    with pytest.raises(ValueError) as caught:
        fc.mcq_search(torch.randn(2, 12, 5, 7), books)
    assert "channel_dim=1" not in str(caught.value)


def _result(impl: str, spread: float | None) -> bench.Result:
    return bench.Result("mcq_search", impl, 0.01, "exact", None, None, spread)


def test_noisy_rounds_and_a_loaded_machine_are_named(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert bench.timing_warnings([_result("a", 0.1), _result("b", None)]) == []
    (line,) = bench.timing_warnings([_result("a", 0.1), _result("slow one", 0.9)])
    assert "slow one (90%)" in line and "a (" not in line
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * (os.cpu_count() or 1), 0, 0))
    (line,) = bench.timing_warnings([_result("a", 0.1)])
    assert "load average" in line and "inflated" in line


def test_missing_extras_are_named_with_the_way_to_add_them(monkeypatch):
    # Whatever this environment has installed: a package is present unless in `missing`.
    missing = {"faiss", "vector_quantize_pytorch"}
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name, *a: None if name in missing else name
    )
    lines = bench.missing_extras("all", "cpu", plotted=False)
    assert len(lines) == 3 and all("fastcompress[bench]" in line for line in lines)
    assert any("faiss-cpu" in line for line in lines)
    assert any("vector-quantize-pytorch" in line for line in lines)
    assert any("matplotlib" in line for line in lines)
    assert bench.missing_extras("none", "cpu", plotted=True) == []
    missing.clear()
    assert bench.missing_extras("all", "cpu", plotted=True) == []


def test_the_demo_report_explains_its_yardstick(tmp_path):
    config = StackConfig(dim=32, grid=(8, 8), depth=1)
    report = run_demo(steps=3, batch=2, config=config, out_dir=str(tmp_path), progress=False)
    text = format_report(report)
    assert f"yardstick {report['mse_upsampled_continuous_pooled']:.4f}" in text
    assert "no quantisation and no decoder" in text
    gap = report["mse_reconstruction"] / report["mse_upsampled_continuous_pooled"]
    assert f"({gap:.1f}x here" in text
    assert "speed-up" in text and "fast vs reference path" in text


def test_the_benchmark_has_an_entropy_table_whose_gradients_match(monkeypatch):
    if not _ext.load_cpu_extension(raise_on_error=False):
        pytest.skip("no C++ extension")
    # Not the Triton interpreter the tests switch on (minutes here; a user's CPU run
    # has no Triton row).
    monkeypatch.setattr(bench, "available_backends", lambda _: {"cpu": "yes"})
    table = bench.bench_mcq_train("mgvq", 300, "cpu", entropy_temp=0.01)
    assert [r.impl for r in table] == ["torch reference", "fastcompress[cpu]"]
    for row in table:
        assert row.op == "mcq_quantize+entropy fwd+bwd mgvq N=300"
        assert row.parity == "grads match", row
    parser = cli.build_parser()
    assert parser.parse_args(["bench"]).entropy_n == 2048
    assert parser.parse_args(["bench", "--entropy-n", "0"]).entropy_n == 0
