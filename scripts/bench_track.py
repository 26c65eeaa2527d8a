"""Performance tracking (issue 23): a history of benchmark runs per machine, a comparison
of the last two, a regression gate on same-run ratios, and a trend report.

    python scripts/bench_track.py key                 # this machine's history key
    python scripts/bench_track.py run [pytest args]   # make bench: the suites, kept in history
    python scripts/bench_track.py compare             # make bench-compare: last run vs previous
    python scripts/bench_track.py check               # make bench-check: the gate (~2 min)
    python scripts/bench_track.py report              # make bench-report: trend PNG + Markdown

History: ``bench-history/<key>/NNNN_<commit>_<date>.json`` (pytest-benchmark's own
storage and file format, ``--benchmark-autosave``), where the key names what the times
depend on: CPU model, the ISA level in use, threads and torch (and, with a GPU, its name
and driver). Ratios, not times, are what the gate judges: these machines are shared and
differ, so the floors (``benchmarks/floors.json``) are same-run ratios per ISA level.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
HISTORY = ROOT / "bench-history"
FLOORS = ROOT / "benchmarks" / "floors.json"
THREADS = int(os.environ.get("FASTCOMPRESS_BENCH_THREADS", "2"))


def machine_key() -> str:
    import torch

    from fastcompress import _ext
    from fastcompress.bench import gpu_info, machine_info

    info = machine_info()
    cpu = re.sub(r"[^A-Za-z0-9]+", "_", str(info.get("cpu", "cpu"))).strip("_")[:40]
    level = _ext.cpu_isa() if _ext.load_cpu_extension(raise_on_error=False) else "reference"
    parts = [cpu, level, f"{THREADS}t", f"torch{torch.__version__.split('+')[0]}"]
    gpu = gpu_info()
    if isinstance(gpu, dict) and gpu.get("name"):
        parts += [re.sub(r"[^A-Za-z0-9]+", "_", gpu["name"]), f"drv{gpu.get('driver', '')}"]
    return "-".join(parts)


# ------------------------------------------------------------------------------ history


def run(pytest_args: list[str]) -> int:
    """The benchmark suites, every run saved under this machine's key."""
    storage = HISTORY / machine_key()
    storage.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
        f"--benchmark-storage=file://{storage}", "--benchmark-autosave",
        "--benchmark-columns=median,iqr,rounds", *pytest_args,
    ]  # fmt: skip
    print("+", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def _runs(key: str | None = None, history: pathlib.Path = HISTORY) -> list[pathlib.Path]:
    folder = history / (key or machine_key())
    return sorted(folder.rglob("*.json"))


def _load(path: pathlib.Path) -> dict:
    """{group: {impl: {median, spread}}} and the run's commit and date."""
    data = json.loads(path.read_text())
    groups: dict[str, dict] = {}
    for bench in data.get("benchmarks", []):
        stats = bench["stats"]
        impl = bench.get("extra_info", {}).get("impl", bench["name"])
        median = stats["median"]
        spread = (stats["max"] - stats["min"]) / median if stats.get("rounds", 1) > 1 else 0.0
        groups.setdefault(bench["group"], {})[impl] = {"median": median, "spread": spread}
    commit = data.get("commit_info", {}).get("id", "")[:10] or data.get("machine_info", {}).get(
        "fastcompress", {}
    ).get("commit", "?")
    return {"groups": groups, "commit": commit, "date": data.get("datetime", "")[:19]}


def ratios(groups: dict) -> dict[str, float]:
    """Same-run ratios per group: reference / ours (every fastcompress impl), faiss / ours,
    and each ISA level's time over the fastest level's."""
    out = {}
    for group, impls in groups.items():
        ref = impls.get("torch reference", {}).get("median")
        faiss = impls.get("faiss-cpu PQ", {}).get("median")
        levels = {k: v["median"] for k, v in impls.items() if k.startswith("fastcompress")}
        best = min(levels.values()) if levels else None
        for impl, t in levels.items():
            if ref:
                out[f"{group}: {impl} vs reference"] = ref / t
            if faiss:
                out[f"{group}: {impl} vs faiss-cpu"] = faiss / t
            if best and len(levels) > 1:
                out[f"{group}: {impl} / fastest level (time)"] = t / best
    return out


def compare(key: str | None = None, history: pathlib.Path = HISTORY) -> int:
    runs = _runs(key, history)
    if len(runs) < 2:
        print(f"fewer than two runs in {history / (key or machine_key())}: run `make bench` twice")
        return 1
    old, new = _load(runs[-2]), _load(runs[-1])
    print(f"{runs[-2].name} ({old['commit']}, {old['date']})  ->  "
          f"{runs[-1].name} ({new['commit']}, {new['date']})\n")  # fmt: skip
    lines = ["| benchmark | before | after | change | noise (spread) |", "|---|---|---|---|---|"]
    for group, impls in new["groups"].items():
        for impl, cur in impls.items():
            prev = old["groups"].get(group, {}).get(impl)
            if prev is None:
                continue
            change = cur["median"] / prev["median"] - 1
            noise = max(cur["spread"], prev["spread"])
            flag = " **beyond noise**" if abs(change) > max(noise, 0.05) else ""
            lines.append(
                f"| {group} / {impl} | {prev['median'] * 1e3:.2f} ms | "
                f"{cur['median'] * 1e3:.2f} ms | {change:+.0%}{flag} | {noise:.0%} |"
            )
    lines += ["", "| same-run ratio | before | after | change |", "|---|---|---|---|"]
    before, after = ratios(old["groups"]), ratios(new["groups"])
    for name, value in after.items():
        if name in before:
            change = value / before[name] - 1
            lines.append(f"| {name} | {before[name]:.2f} | {value:.2f} | {change:+.0%} |")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------- gate


def quick_ratios(levels: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The gate's quick profile: small shapes, a few rounds, the torch reference and the
    C++ kernels at each ISA level this CPU has, all in this one run. {level: {name: ratio}}."""
    import torch

    import fastcompress as fc
    from fastcompress import _ext
    from fastcompress.bench import make_mcq_inputs
    from fastcompress.reference.compress import compress_reference
    from fastcompress.reference.mcq import mcq_search_reference

    torch.set_num_threads(THREADS)

    def timed(fn) -> float:
        """The fastest of the rounds: a gate must not fail on another process's spike."""
        fn()
        rounds, start = [], time.perf_counter()
        while len(rounds) < 3 or (time.perf_counter() - start < 0.6 and len(rounds) < 15):
            t0 = time.perf_counter()
            fn()
            rounds.append(time.perf_counter() - t0)
        return min(rounds)

    z, books = make_mcq_inputs("unitok", 4096)
    zm, bm = make_mcq_inputs("mgvq", 4096)
    ze, be = make_mcq_inputs("unitok", 512)
    has_ext = _ext.load_cpu_extension(raise_on_error=False)
    # Without the C++ kernels (a failed build, or FASTCOMPRESS_DISABLE_CPU_EXT=1) 'auto'
    # is timed, which then runs the reference: the gate must fail, naming every workload.
    ours_backend = "cpu" if has_ext else None

    def entropy_step(backend):
        def step():
            zz, bb = ze.clone().requires_grad_(), be.clone().requires_grad_()
            out = fc.mcq_quantize(zz, bb, entropy_temp=0.01, backend=backend)
            (out.vq_loss + out.entropy_loss + out.z_q.sum()).backward()

        return step

    mha = torch.nn.MultiheadAttention(256, 8, batch_first=True)
    weights = (torch.randn(4, 256), mha.in_proj_weight.detach(), mha.in_proj_bias.detach(),
               mha.out_proj.weight.detach(), mha.out_proj.bias.detach(), 8)  # fmt: skip
    x = torch.randn(4, 32 * 32, 256)
    workloads = {
        "mcq_search unitok N=4096": (
            lambda: fc.mcq_search(z, books, backend=ours_backend),
            lambda: mcq_search_reference(z, books),
        ),
        "mcq_search mgvq N=4096": (
            lambda: fc.mcq_search(zm, bm, backend=ours_backend),
            lambda: mcq_search_reference(zm, bm),
        ),
        "mcq_quantize+entropy fwd+bwd unitok N=512": (
            entropy_step(ours_backend),
            entropy_step("reference"),
        ),
        "compress d=256 32x32 B=4": (
            lambda: fc.compress(x, (32, 32), 2, *weights, backend=ours_backend),
            lambda: compress_reference(x, (32, 32), 2, *weights),
        ),
    }
    references = {name: timed(ref) for name, (_, ref) in workloads.items()}
    if not has_ext:
        return {"no-extension": {n: references[n] / timed(ours) for n, (ours, _) in
                                 workloads.items()}}  # fmt: skip
    out = {}
    for level in levels or _ext.supported_cpu_isas():
        with _ext.forced_cpu_isa(level):
            out[level] = {name: references[name] / timed(ours)
                          for name, (ours, _) in workloads.items()}  # fmt: skip
    return out


def check() -> int:
    floors = json.loads(FLOORS.read_text())["floors"]
    measured = quick_ratios()
    failures = []
    for level, values in measured.items():
        level_floors = floors.get(level) or floors["baseline"]
        for name, ratio in values.items():
            floor = level_floors[name]
            verdict = "ok" if ratio >= floor else "BELOW FLOOR"
            print(f"{level:10s} {name:45s} {ratio:8.1f}x the reference  (floor {floor}x)  "
                  f"{verdict}")  # fmt: skip
            if ratio < floor:
                failures.append(f"{level}: {name} at {ratio:.1f}x, floor {floor}x")
    if failures:
        print("\nbench-check FAILED: " + "; ".join(failures), file=sys.stderr)
        print(
            "A same-run ratio fell below its floor (benchmarks/floors.json): a slower kernel, "
            "a kernel no longer used (is the C++ extension built? `fastcompress info`), or a "
            "very noisy machine (re-run; the floors keep a margin of about 2x).",
            file=sys.stderr,
        )
        return 1
    print("\nbench-check passed: every same-run ratio is above its floor")
    return 0


# ------------------------------------------------------------------------------- report


def report(out_dir: pathlib.Path = ROOT / "bench-results", history: pathlib.Path = HISTORY) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[str, float]]] = {}
    for key_dir in sorted(p for p in history.glob("*") if p.is_dir()):
        for path in sorted(key_dir.rglob("*.json")):
            run_ = _load(path)
            # The run's number in the history (two runs of one commit stay apart).
            label = f"#{path.name[:4]} {run_['commit'][:7]}\n{run_['date'][:16]}"
            for name, value in ratios(run_["groups"]).items():
                if name.endswith("vs reference") and "fastcompress[" in name:
                    series.setdefault(f"{name} [{key_dir.name}]", []).append((label, value))
    if not series:
        print(f"no history in {history}: run `make bench` first")
        return 1
    lines = ["| workload (machine) | " + " | ".join(["runs, oldest first"]) + " |", "|---|---|"]
    for name, points in series.items():
        values = ", ".join(f"{v:.1f}x ({label.replace(chr(10), chr(32))})" for label, v in points)
        lines.append(f"| {name} | {values} |")
    (out_dir / "trend.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"trend table: {out_dir / 'trend.md'} (no PNG: matplotlib not installed)")
        return 0
    fig, ax = plt.subplots(figsize=(11, 5 + 0.18 * len(series)))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_ylabel("same-run speed-up over the torch reference (x)")
    ax.set_xlabel("run (history number, commit, date)")
    ax.set_yscale("log")
    ax.set_title("fastcompress against the torch reference, run by run (bench-history)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    fig.tight_layout()
    fig.savefig(out_dir / "trend.png", dpi=110)
    print(f"trend: {out_dir / 'trend.png'}, {out_dir / 'trend.md'}")
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "key"
    if command == "key":
        print(machine_key())
        return 0
    if command == "run":
        return run(argv[1:])
    if command == "compare":
        return compare(argv[1] if len(argv) > 1 else None)
    if command == "check":
        return check()
    if command == "report":
        return report()
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
