"""`auto` on a GPU uses a kernel only after an on-device parity probe (the probe logic is
tested here with fake verdicts and a fake device key), and `fastcompress selftest
--device cpu` writes its report."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastcompress import _backend, _probe
from fastcompress.selftest import CHECKS, run_checks


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_probe, "device_key", lambda device: "Fake GPU | sm_90 | torch x")
    _probe.clear_memory()
    yield tmp_path
    _probe.clear_memory()


def test_a_passing_probe_is_recorded_and_run_once(probe_cache):
    calls = []

    def probe(backend, family, device):
        calls.append((backend, family))
        return {"max_err": 1e-7}

    cuda = torch.device("cuda")
    assert _probe.verdict("triton", "mcq_search", cuda, probe)["ok"]
    assert _probe.verdict("triton", "mcq_quantize", cuda, probe)["ok"]  # same family
    assert calls == [("triton", "mcq")]
    stored = json.loads((probe_cache / "probes.json").read_text())
    assert stored["Fake GPU | sm_90 | torch x"]["triton/mcq"]["ok"] is True
    _probe.clear_memory()  # a new process reads the file, and does not probe again
    assert _probe.verdict("triton", "mcq_search", cuda, probe)["ok"] and len(calls) == 1


def test_a_failing_probe_warns_with_the_kernel_and_the_error(probe_cache):
    def probe(backend, family, device):
        raise AssertionError("decode out: max |error| 0.5")

    with pytest.warns(RuntimeWarning, match=r"triton kernel for decode_attention.*0\.5"):
        got = _probe.verdict("triton", "decode_attention", torch.device("cuda"), probe)
    assert not got["ok"] and "0.5" in got["error"]


def test_a_failing_probe_is_recorded_and_not_run_again(probe_cache):
    calls = []

    def probe(backend, family, device):
        calls.append((backend, family))
        raise AssertionError("mcq indices: 12 of 512 differ")

    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="failed its parity probe"):
        assert not _probe.verdict("cuda", "mcq_search", cuda, probe)["ok"]
    stored = json.loads((probe_cache / "probes.json").read_text())
    row = stored["Fake GPU | sm_90 | torch x"]["cuda/mcq"]
    assert row["ok"] is False and "12 of 512" in row["error"]
    _probe.clear_memory()  # a new process reads the failed verdict and does not probe again
    with pytest.warns(RuntimeWarning, match="12 of 512"):
        assert not _probe.verdict("cuda", "mcq_quantize", cuda, probe)["ok"]
    assert calls == [("cuda", "mcq")]


def test_auto_on_gpu_follows_the_verdicts(probe_cache):
    cuda = torch.device("cuda")
    everything = lambda name, device: (True, "")  # noqa: E731
    verdicts = {"cuda": False, "triton": True}

    def fake_verdict(backend, op, device):
        return {"ok": verdicts[backend], "error": ""}

    assert _backend.choose_auto_gpu("mcq_search", cuda, everything, fake_verdict) == "triton"
    verdicts["triton"] = False
    assert _backend.choose_auto_gpu("mcq_search", cuda, everything, fake_verdict) == "reference"
    verdicts["cuda"] = True
    assert _backend.choose_auto_gpu("mcq_search", cuda, everything, fake_verdict) == "cuda"
    # the CUDA C++ backend has no compressor kernel: never a candidate there
    assert _backend.choose_auto_gpu("compress", cuda, everything, fake_verdict) == "reference"
    nothing = lambda name, device: (False, "not built")  # noqa: E731
    assert _backend.choose_auto_gpu("mcq_search", cuda, nothing, fake_verdict) == "reference"


def test_the_real_probe_passes_for_the_cpu_backend(probe_cache):
    # The probes are the selftest's checks: on CPU they run the C++ backend for real.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for family in ("mcq", "compress", "decode_attention", "voco"):
            assert _probe.verdict("cpu", family, torch.device("cpu"))["ok"], family


def test_every_check_fails_on_a_wrong_backend(monkeypatch):
    # A check that cannot fail is no probe: break the cpu backend's outputs and expect FAIL.
    # The parity cases live with their ops and call the op modules' own functions.
    # (importlib: the package's `compress` attribute is the function, not the module.)
    import importlib

    mcq, compress, decode, voco = (
        importlib.import_module(f"fastcompress.{name}")
        for name in ("mcq", "compress", "decode", "voco")
    )
    homes = {"mcq_search": mcq, "mcq_quantize": mcq, "compress": compress,
             "decode_attention": decode, "voco_attention": voco}  # fmt: skip
    real = {name: getattr(module, name) for name, module in homes.items()}

    def broken(name):
        def call(*args, backend=None, **kwargs):
            out = real[name](*args, backend=backend, **kwargs)
            if backend != "cpu":
                return out
            if name == "mcq_search":
                return (out + 1) % args[1].shape[1]
            if name == "mcq_quantize":
                return out._replace(vq_loss=out.vq_loss * 1.01)
            if isinstance(out, tuple):
                return (out[0] * 1.01, *out[1:])
            return out * 1.01

        return call

    for name in real:
        monkeypatch.setattr(homes[name], name, broken(name))
    rows = run_checks(torch.device("cpu"), progress=lambda line: None)
    assert {r["check"] for r in rows} == set(CHECKS) - {"generate"} | {"generate"}
    failed = {r["check"] for r in rows if not r["ok"]}
    assert {"mcq", "compress", "decode_attention", "voco"} <= failed


def test_selftest_cpu_writes_its_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fastcompress", "selftest", "--device", "cpu", "--n", "2048",
         "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        # as a user runs it: without the tests' TRITON_INTERPRET (the interpreter would add
        # the triton backend on CPU tensors, minutes of interpreted kernels)
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "selftest.json").read_text())
    checks = {(r["backend"], r["check"]) for r in report["checks"]}
    assert {("cpu", name) for name in CHECKS} <= checks
    assert all(r["ok"] for r in report["checks"])
    assert {r["impl"] for r in report["benchmarks"]} >= {"fastcompress[cpu]", "torch reference"}
    text = (tmp_path / "selftest.md").read_text()
    assert "| cpu | mcq | pass |" in text and "torch:" in text
    assert (tmp_path / "selftest.png").stat().st_size > 10_000
