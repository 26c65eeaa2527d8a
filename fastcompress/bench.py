"""Benchmark harness shared by ``fastcompress bench`` and ``benchmarks/`` (pytest-benchmark).

Every implementation of an op is timed on the same inputs in the same process, checked
against the reference, and reported as a ratio. Peak memory: on CUDA the allocator's
peak; on CPU the process's peak RSS above its RSS before the call (Linux resets the
peak through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

import fastcompress as fc
from fastcompress import peers as peers_mod
from fastcompress._backend import available_backends
from fastcompress._parity import code_parity
from fastcompress.reference import mcq_quantize_reference, mcq_search_reference

MCQ_CONFIGS = {
    "unitok": dict(groups=8, vocab=4096, dim=8),  # UniTok: 8 x 4096 x 8, C = 64
    "mgvq": dict(groups=8, vocab=2048, dim=4),  # MGVQ: 8 x 2048 x 4, C = 32
}


@dataclasses.dataclass
class Result:
    op: str
    impl: str
    seconds: float
    parity: str
    peak_mb: float | None
    speedup: float | None = None
    spread: float | None = None  # (max - min) / median of the rounds; None for one round

    def row(self) -> list[str]:
        peak = "-" if self.peak_mb is None else f"{self.peak_mb:.1f}"
        speed = "-" if self.speedup is None else f"{self.speedup:.1f}x"
        spread = "-" if self.spread is None else f"{self.spread:.0%}"
        return [self.impl, self.parity, f"{self.seconds * 1e3:.1f}", spread, speed, peak]


# ------------------------------------------------------------------------ measurement


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def measure(
    fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5, max_repeats: int = 20
) -> tuple[float, float | None]:
    """(median seconds, peak extra MiB): :func:`measure_rounds` without the spread."""
    seconds, _, peak = measure_rounds(fn, device, min_seconds, max_repeats)
    return seconds, peak


def measure_rounds(
    fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5, max_repeats: int = 20
) -> tuple[float, float | None, float | None]:
    """(median seconds, spread of the rounds, peak extra MiB). The warm-up call is the one
    whose peak memory is read; slow calls (> 2 s) are then timed once (no spread), fast
    ones at least 3 times and until ``min_seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    peak = _peak_memory_mb(fn, device)
    warm = time.perf_counter() - start
    repeats = 1 if warm > 2.0 else max(3, min(max_repeats, int(min_seconds / max(warm, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    spread = (max(times) - min(times)) / median if len(times) > 1 else None
    return median, spread, peak


def _return_freed_memory() -> None:
    """Make freed memory leave the RSS, so that the peak RSS of a call measures what the
    call needs. glibc keeps freed heap chunks, and after the first large free it raises
    its mmap threshold (up to 32 MiB), so a repeated call reuses memory already counted
    and reads as a 0 MiB peak. Pinning the threshold keeps every large tensor in its own
    mapping (returned on free); malloc_trim releases what the heap holds."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 256 * 1024)
    libc.malloc_trim(0)


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        _return_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status()["VmRSS"]
    except OSError:
        fn()
        return None
    fn()
    return max(0, _status()["VmHWM"] - before) / 1024


# ---------------------------------------------------------------------- MCQ workloads


def make_mcq_inputs(config: str, n: int, device: str = "cpu", seed: int = 0):
    shape = MCQ_CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, shape["groups"] * shape["dim"], generator=gen).to(device)
    books = torch.randn(shape["groups"], shape["vocab"], shape["dim"], generator=gen).to(device)
    return z, books


def mcq_search_impls(z: torch.Tensor, books: torch.Tensor, peers: str = "faiss"):
    """name -> (callable returning (N, G) indices, input it is called with).

    ``peers``: "none", "faiss", or "all" (adds vector-quantize-pytorch, whose full
    h x N x K distance matrix peaks at ~8 GB at the UniTok shape with N = 16384)."""
    if peers not in ("none", "faiss", "all"):
        raise ValueError(f"peers must be 'none', 'faiss' or 'all', got {peers!r}")
    impls: dict[str, tuple[Callable, torch.Tensor]] = {}
    device = z.device
    for name, status in available_backends(device).items():
        if status == "yes" and name != "reference":
            impls[f"fastcompress[{name}]"] = (
                lambda x, name=name: fc.mcq_search(x, books, backend=name),
                z,
            )
    for level in _lower_cpu_levels(impls):
        impls[f"fastcompress[cpu:{level}]"] = (
            lambda x, level=level: _at_cpu_level(level, fc.mcq_search, x, books, backend="cpu"),
            z,
        )
    impls["torch reference"] = (lambda x: mcq_search_reference(x, books), z)
    impls["UniTok-style torch"] = (lambda x: peers_mod.unitok_style_search(x, books), z)
    if peers != "none" and device.type == "cpu":
        unit = peers_mod.unit_chunks(z, books)
        if importlib.util.find_spec("faiss"):
            impls["faiss-cpu PQ"] = (peers_mod.FaissPQ(books), unit.numpy())
        if peers == "all" and importlib.util.find_spec("vector_quantize_pytorch"):
            impls["vector-quantize-pytorch"] = (peers_mod.VectorQuantizePytorch(books), unit)
    return impls


def _lower_cpu_levels(impls: dict) -> list[str]:
    """The C++ ISA levels below the one in use (which is ``fastcompress[cpu]``), so that
    one run shows every level this CPU has side by side (issue 12)."""
    if "fastcompress[cpu]" not in impls:
        return []
    from fastcompress import _ext

    levels = _ext.supported_cpu_isas()
    return levels[levels.index(_ext.cpu_isa()) + 1 :]


def _at_cpu_level(level: str, fn: Callable, *args, **kwargs):
    from fastcompress import _ext

    with _ext.forced_cpu_isa(level):
        return fn(*args, **kwargs)


def index_parity(idx: torch.Tensor, ref: torch.Tensor, z: torch.Tensor, books: torch.Tensor) -> str:
    """'exact', 'N near-ties (gap)', or 'FAIL ...' under the near-tie rule of
    :mod:`fastcompress._parity` (cosine scores, as every benchmarked search is)."""
    result = code_parity(z, books, idx, ref, normalize=True)
    if result.failure is not None:
        return f"FAIL {result.failure}"
    return "exact" if result.differ == 0 else f"{result.differ} near-ties ({result.gap:.0e})"


def bench_mcq_search(
    config: str = "unitok", n: int = 16384, device: str = "cpu", peers: str = "faiss", progress=None
) -> list[Result]:
    z, books = make_mcq_inputs(config, n, device)
    ref = mcq_search_reference(z, books)
    results = []
    for impl, (fn, x) in mcq_search_impls(z, books, peers).items():
        if progress:
            progress(impl)
        idx = torch.as_tensor(fn(x))
        seconds, spread, peak = measure_rounds(lambda fn=fn, x=x: fn(x), z.device)
        results.append(
            Result(
                f"mcq_search {config} N={n}",
                impl,
                seconds,
                index_parity(idx, ref, z, books),
                peak,
                spread=spread,
            )  # fmt: skip
        )
    return _with_speedups(results, "torch reference")


def bench_mcq_train(
    config: str = "unitok",
    n: int = 16384,
    device: str = "cpu",
    progress=None,
    entropy_temp: float | None = None,
) -> list[Result]:
    """Forward + backward of mcq_quantize (training) against the reference autograd.
    With ``entropy_temp``, UniTok's entropy loss is added (its torch reference: the
    row-chunked reference backend, since UniTok's dense G x N x K formula does not fit
    at large N)."""
    z0, books0 = make_mcq_inputs(config, n, device)
    weight = torch.randn_like(z0)

    def step(run):
        z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
        z_q, loss = run(z, books)
        ((z_q * weight).sum() + loss).backward()
        return z.grad, books.grad

    def reference(z, books):
        z_q, _, loss, _ = mcq_quantize_reference(z, books)
        return z_q, loss

    def ours(name):
        def run(z, books):
            out = fc.mcq_quantize(z, books, entropy_temp=entropy_temp, backend=name)
            loss = out.vq_loss if entropy_temp is None else out.vq_loss + out.entropy_loss
            return out.z_q, loss

        return run

    impls = {"torch reference": reference if entropy_temp is None else ours("reference")}
    for name, status in available_backends(z0.device).items():
        if status == "yes" and name != "reference":
            impls[f"fastcompress[{name}]"] = ours(name)
    want = step(impls["torch reference"])
    results = []
    for impl, run in impls.items():
        if progress:
            progress(impl)
        got = step(run)
        ok = all(
            torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(got, want, strict=False)
        )
        seconds, spread, peak = measure_rounds(lambda run=run: step(run), z0.device)
        results.append(
            Result(
                f"mcq_quantize{'' if entropy_temp is None else '+entropy'} fwd+bwd {config} N={n}",
                impl,
                seconds,
                "grads match" if ok else "FAIL grads",
                peak,
                spread=spread,
            )
        )
    return _with_speedups(results, "torch reference")


def _with_speedups(results: list[Result], baseline: str) -> list[Result]:
    base = next(r.seconds for r in results if r.impl == baseline)
    for r in results:
        r.speedup = base / r.seconds
    return results


# --------------------------------------------------------------------------- reports


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
        flags = next(
            line.split(":", 1)[1].split()
            for line in lines
            if line.startswith(("flags", "Features"))
        )
        info["cpu_simd"] = sorted(set(flags) & SIMD_FLAGS)
    except (OSError, StopIteration):
        pass
    try:
        from fastcompress import _ext

        if _ext.load_cpu_extension(raise_on_error=False):
            info["cpu_isa"] = _ext.cpu_isa()
            info["cpu_isa_supported"] = _ext.supported_cpu_isas()
            if _ext.avx512_emulated():
                info["cpu_isa_note"] = "avx512 level emulated on AVX2 (test build)"
        else:
            info["cpu_isa"] = f"no C++ extension ({_ext.cpu_error()[:200]})"
    except ValueError as exc:  # a bad FASTCOMPRESS_CPU_ISA
        info["cpu_isa"] = str(exc)
    info["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["commit"] = _commit()
    if importlib.util.find_spec("triton"):
        import triton

        info["triton"] = triton.__version__
    info["gpu"] = gpu_info()
    return info


SIMD_FLAGS = {
    "sse2", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
    "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile",
    "asimd", "sve", "sve2", "bf16",
}  # fmt: skip


def _commit() -> str:
    """The checkout's commit (with '-dirty' for local changes), or 'unknown' outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_info() -> dict | str:
    """GPU name, driver, clocks and memory through NVML; a reason string without one."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound on machines without a driver
        return f"no NVML ({type(exc).__name__})"
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": str(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_total_mb": mem.total // 2**20,
        }
    finally:
        pynvml.nvmlShutdown()


def format_table(results: list[Result]) -> str:
    header = ["implementation", "parity vs reference", "ms (median)", "spread", "speed-up",
              "peak MiB"]  # fmt: skip
    rows = [header] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"== {results[0].op} =="]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(results: list[Result], out_dir: str, name: str = "bench") -> tuple[str, str | None]:
    """Write ``name.json`` (results + machine info) and, with matplotlib, ``name.png``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(
            {"machine": machine_info(), "results": [dataclasses.asdict(r) for r in results]},
            f,
            indent=2,
        )
    return path, plot(results, os.path.join(out_dir, f"{name}.png"))


def missing_extras(peers: str, device: str, plotted: bool) -> list[str]:
    """What a run left out because an optional package is missing, and how to add it."""
    extra = "pip install 'fastcompress[bench]' (or `make bench` in a checkout)"
    lines = []
    if peers != "none" and device == "cpu" and importlib.util.find_spec("faiss") is None:
        lines.append(f"note: no faiss-cpu row: faiss-cpu is not installed; {extra}")
    if peers == "all" and importlib.util.find_spec("vector_quantize_pytorch") is None:
        lines.append(f"note: no vector-quantize-pytorch row: it is not installed; {extra}")
    if not plotted:
        lines.append(f"note: no PNG: matplotlib is not installed; {extra}")
    return lines


# Spread of the rounds (max - min over the median) above which a time is called noisy.
NOISY_SPREAD = 0.5


def timing_warnings(results: list[Result]) -> list[str]:
    """Warnings when the times are not to be trusted: a large spread between rounds, or a
    loaded machine (a 1-minute load average above the cores' count)."""
    lines = []
    noisy = [r for r in results if r.spread is not None and r.spread > NOISY_SPREAD]
    if noisy:
        names = ", ".join(f"{r.impl} ({r.spread:.0%})" for r in noisy[:4])
        lines.append(
            f"warning: the rounds of {names} spread by more than {NOISY_SPREAD:.0%} of their "
            "median: the machine is busy or its clock moves; compare ratios, or re-run"
        )
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    cores = os.cpu_count() or 1
    if load > cores:
        lines.append(
            f"warning: the machine's load average is {load:.1f} on {cores} cores: other "
            "processes share the CPU, so the times (not the same-run ratios) are inflated"
        )
    return lines


def plot(results: list[Result], path: str) -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 2.2 + 0.45 * len(results)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=False):
        rows = [r for r in results if r.op == op]
        ms = [r.seconds * 1e3 for r in rows]
        colors = ["tab:green" if r.impl.startswith("fastcompress") else "tab:gray" for r in rows]
        bars = ax.barh([r.impl for r in rows], ms, color=colors)
        # Linear from 0: bar lengths are proportional to time (a log axis that starts
        # near the fastest bar makes every difference look large).
        ax.set_xlim(0, max(ms) * 1.35)
        ax.invert_yaxis()
        ax.set_title(op)
        ax.set_xlabel("milliseconds (lower is better)")
        for bar, r in zip(bars, rows, strict=False):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {r.seconds * 1e3:.1f} ms ({r.speedup:.1f}x)",
                va="center",
                fontsize=8,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
