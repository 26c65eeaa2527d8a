"""Performance tracking (issue 23): the history's comparison and trend report on
pytest-benchmark files, and the regression gate, which must fail, naming every ratio,
when the fast path is gone."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_track", ROOT / "scripts" / "bench_track.py")
track = importlib.util.module_from_spec(spec)
spec.loader.exec_module(track)


def _run_file(path, commit, ours_ms, ref_ms, spread=0.02):
    """A pytest-benchmark JSON with one group: fastcompress at two levels and the reference."""
    benches = []
    for impl, ms in (("fastcompress[cpu:avx2]", ours_ms), ("fastcompress[cpu:baseline]",
                     ours_ms * 3), ("torch reference", ref_ms)):  # fmt: skip
        t = ms / 1e3
        benches.append({
            "group": "mcq_search unitok N=16384", "name": f"test[{impl}]",
            "extra_info": {"impl": impl},
            "stats": {"median": t, "min": t * (1 - spread / 2), "max": t * (1 + spread / 2),
                      "rounds": 10},
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmarks": benches, "commit_info": {"id": commit},
                                "datetime": "2026-12-01T12:00:00"}))  # fmt: skip


def test_ratios_compare_and_report(tmp_path, capsys):
    history = tmp_path / "history"
    _run_file(history / "KEY" / "0001_a.json", "aaaaaaa", 50.0, 1200.0)
    _run_file(history / "KEY" / "0002_b.json", "bbbbbbb", 80.0, 1200.0)  # 60 % slower
    run = track._load(history / "KEY" / "0002_b.json")
    ratios = track.ratios(run["groups"])
    assert ratios["mcq_search unitok N=16384: fastcompress[cpu:avx2] vs reference"] == 15.0
    assert (
        ratios["mcq_search unitok N=16384: fastcompress[cpu:baseline] / fastest level (time)"]
        == 3.0
    )
    assert track.compare("KEY", history) == 0
    text = capsys.readouterr().out
    assert "+60% **beyond noise**" in text and "| 24.00 | 15.00 | -3" in text
    assert track.report(tmp_path / "out", history) == 0
    assert (tmp_path / "out" / "trend.png").stat().st_size > 5_000
    trend = (tmp_path / "out" / "trend.md").read_text()
    assert "24.0x (#0001 aaaaaaa" in trend and "15.0x (#0002 bbbbbbb" in trend


def test_compare_needs_two_runs(tmp_path):
    _run_file(tmp_path / "KEY" / "0001_a.json", "a", 1.0, 10.0)
    assert track.compare("KEY", tmp_path) == 1


def test_every_floor_has_a_workload_and_a_note():
    floors = json.loads((ROOT / "benchmarks" / "floors.json").read_text())
    assert floors["note"]
    names = None
    for level in ("avx512", "avx2", "baseline"):
        assert set(floors["floors"][level]) == (names or set(floors["floors"][level]))
        names = set(floors["floors"][level])
        assert all(value > 1 for value in floors["floors"][level].values())


def test_the_gate_fails_without_the_fast_path():
    # With the C++ extension disabled every op runs on the reference: each same-run ratio
    # is ~1, and the gate must fail naming the workloads and their ratios.
    env = {**os.environ, "FASTCOMPRESS_DISABLE_CPU_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_track.py"), "check"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "bench-check FAILED" in out.stderr
    for name in ("mcq_search unitok N=4096", "mcq_quantize+entropy fwd+bwd unitok N=512"):
        assert f"no-extension: {name} at " in out.stderr
    assert "BELOW FLOOR" in out.stdout


if __name__ == "__main__":
    pytest.main([__file__])
