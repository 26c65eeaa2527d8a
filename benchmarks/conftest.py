"""pytest-benchmark setup: machine info (CPU, torch/triton, GPU through NVML) in every
saved JSON, thread count pinned, and a ratio table per group at the end of the run."""

import json
import os

import pytest
import torch

THREADS = int(os.environ.get("FASTCOMPRESS_BENCH_THREADS", "2"))


def pytest_configure(config):
    torch.set_num_threads(THREADS)
    try:
        import faiss

        faiss.omp_set_num_threads(THREADS)
    except ImportError:
        pass


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastcompress.bench import machine_info as ours

    machine_info["fastcompress"] = ours()


def _median(bench):
    return bench.stats.median if hasattr(bench.stats, "median") else bench.stats.stats.median


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    report = {}
    terminalreporter.section("fastcompress ratios (same run)")
    for group, benches in groups.items():
        times = {b.extra_info.get("impl", b.name): _median(b) for b in benches}
        base = times.get("torch reference")
        terminalreporter.write_line(f"{group}")
        for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
            info = next(b.extra_info for b in benches if b.extra_info.get("impl", b.name) == impl)
            ratio = f"{base / t:7.1f}x vs reference" if base else ""
            peers = {
                k: times[k] / t for k in ("faiss-cpu PQ", "vector-quantize-pytorch") if k in times
            }
            peer_txt = (
                "  ".join(f"{v:.1f}x vs {k}" for k, v in peers.items())
                if impl.startswith("fastcompress")
                else ""
            )
            levels = {k: v for k, v in times.items() if k.startswith("fastcompress[cpu:")}
            if impl in levels and len(levels) > 1:
                best = min(levels.values())
                peer_txt += f"  {t / best:.2f}x the fastest ISA level's time"
            peak = info.get("peak_mb")
            peak_txt = f"peak {peak:.1f} MiB" if peak is not None else ""
            terminalreporter.write_line(
                f"  {impl:28s} {t * 1e3:9.1f} ms  {ratio}  {peer_txt}  {peak_txt}  "
                f"{info.get('parity', '')}"
            )
            report.setdefault(group, {})[impl] = {"seconds": t, **info}
    out = os.environ.get("FASTCOMPRESS_BENCH_REPORT", "bench-results/ratios.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    terminalreporter.write_line(f"ratios written to {out}")


@pytest.fixture
def record():
    """Attach impl name, parity and peak memory to a benchmark."""

    def _record(benchmark, impl, parity, peak_mb):
        benchmark.extra_info.update(impl=impl, parity=parity, peak_mb=peak_mb)

    return _record
