"""``fastcompress selftest``: every backend that can run on a device against the reference,
then the benchmark tables for that device, in one report (JSON, Markdown, PNG).

The parity section runs each op module's own parity case (the same cases are the
on-device probes of ``auto``; ``_probe.py`` keeps their verdicts): each takes a backend
and a device, runs small random problems (odd sizes) through that backend and the
reference, and raises AssertionError with the largest error when they disagree.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import torch

import fastcompress as fc
from fastcompress import _probe
from fastcompress._parity import assert_close as _close
from fastcompress.compress import mha_weights


def check_generate(backend: str, device: torch.device) -> dict:
    from fastcompress.nn import ARDecompressor

    torch.manual_seed(4)
    model = ARDecompressor(64, 2, 4, 40).to(device).eval()
    context = torch.randn(2, 12, 64, device=device)
    out = {}
    graphs = (False, True) if device.type == "cuda" else (False,)
    model.backend = "reference"
    want = model.generate(context, 40)
    for graph in graphs:
        model.backend = backend
        got = model.generate(context, 40, use_cuda_graph=graph)
        out[f"cuda_graph={graph}"] = _close("generate", got, want, atol=1e-4)
    return out


def check_autocast(backend: str, device: torch.device) -> dict:
    """Inside ``torch.autocast(<device>, bfloat16)`` the ops give the float32 numbers."""
    torch.manual_seed(5)
    out = {}
    z0 = torch.randn(4, 75, 64, device=device)
    books0 = torch.randn(8, 130, 8, device=device)
    weights = mha_weights(48, 4, 3, device)
    x0 = torch.randn(2, 96, 48, device=device)
    runs = {}
    for autocast in (False, True):
        z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            q = fc.mcq_quantize(z, books, entropy_temp=0.01, backend=backend)
            meta, pooled = fc.compress(x0, (8, 12), 2, *weights, backend=backend)
        loss = q.vq_loss + q.entropy_loss + q.z_q.sum()
        runs[autocast] = (q.indices, q.z_q, q.entropy_loss, *torch.autograd.grad(loss, books),
                          meta, pooled)  # fmt: skip
    got, want = runs[True], runs[False]
    if not torch.equal(got[0], want[0]):
        raise AssertionError("autocast: mcq indices differ from the float32 run")
    for label, g, w in zip(("z_q", "entropy_loss", "grad codebooks", "meta", "pooled"), got[1:],
                           want[1:], strict=True):  # fmt: skip
        if g.dtype != torch.float32:
            raise AssertionError(f"autocast: {label} is {g.dtype}, not float32")
        out[label] = _close(f"autocast {label}", g, w, atol=1e-5, rtol=1e-5)
    return out


# The op modules' own parity cases (the GPU probes run the same), then the checks that
# span several ops.
PROBES = dict(_probe.CASES)
CHECKS = {**PROBES, "generate": check_generate, "autocast": check_autocast}


def backends_for(device: torch.device) -> list[str]:
    from fastcompress._backend import available_backends

    return [
        n
        for n, status in available_backends(device).items()
        if status == "yes" and n != "reference"
    ]


def run_checks(device: torch.device, progress=print) -> list[dict]:
    rows = []
    for backend in backends_for(device):
        for name, check in CHECKS.items():
            if backend == "cuda" and name != "mcq":
                continue  # the CUDA C++ backend has the MCQ search only
            start = time.perf_counter()
            try:
                detail, ok = check(backend, device), True
            except Exception as exc:
                detail, ok = {"error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc(limit=3)}, False  # fmt: skip
            rows.append({"check": name, "backend": backend, "ok": ok,
                         "seconds": time.perf_counter() - start, "detail": detail})  # fmt: skip
            progress(f"  {'PASS' if ok else 'FAIL'} {backend:8s} {name}")
    return rows


def run_selftest(device: str, out_dir: str, n: int, quick: bool, progress=print) -> dict:
    from fastcompress import bench

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    progress(f"selftest on {device}: parity checks")
    report = {
        "device": device,
        "machine": bench.machine_info(),
        "checks": run_checks(dev, progress),
    }
    progress("benchmarks")
    results = []
    for config in ("unitok", "mgvq"):
        results += bench.bench_mcq_search(config, n, device, "none" if quick else "faiss")
        results += bench.bench_mcq_train(config, n, device)
    report["benchmarks"] = [dict(r.__dict__) for r in results]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "selftest.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    png = _plot(report["checks"], results, os.path.join(out_dir, "selftest.png"))
    with open(os.path.join(out_dir, "selftest.md"), "w") as f:
        f.write(format_markdown(report, results, png))
    report["passed"] = all(row["ok"] for row in report["checks"]) and not any(
        r.parity.startswith("FAIL") for r in results
    )
    return report


def _plot(checks: list[dict], results, path: str) -> str | None:
    """Every parity check (each op's largest error against the reference, pass / fail)
    above the benchmarks' speed-ups: the whole selftest at a glance."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 2.5 + 0.3 * (len(checks) + len(results))),
        gridspec_kw={"height_ratios": [max(len(checks), 1), max(len(results), 1)]},
    )  # fmt: skip
    labels, errors, colours = [], [], []
    for row in checks:
        values = [v for v in row["detail"].values() if isinstance(v, float)] if row["ok"] else []
        labels.append(f"{row['backend']} {row['check']}")
        errors.append(max(values, default=0.0) or 1e-9)
        colours.append("tab:green" if row["ok"] else "tab:red")
    top.barh(labels, errors, color=colours)
    top.set_xscale("log")
    top.invert_yaxis()
    top.set_title("parity with the reference: largest |error| per check (red: FAILED)")
    top.set_xlabel("max |error| (log)")
    names = [f"{r.op}: {r.impl}" for r in results]
    speedups = [r.speedup or 0.0 for r in results]
    bars = bottom.barh(names, speedups, color=["tab:green" if r.impl.startswith("fastcompress")
                                                else "tab:gray" for r in results])  # fmt: skip
    for bar, value in zip(bars, speedups, strict=True):
        bottom.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f}x",
                    va="center", fontsize=7)  # fmt: skip
    bottom.invert_yaxis()
    bottom.set_xlabel("speed-up over the torch reference (same run)")
    bottom.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_markdown(report: dict, results, png: str | None) -> str:
    machine = report["machine"]
    lines = [f"# fastcompress selftest on {report['device']}", ""]
    for key in ("date_utc", "commit", "torch", "triton", "cpu", "cpu_isa", "gpu"):
        if key in machine:
            lines.append(f"- {key}: {machine[key]}")
    lines += ["", "## Parity against the reference", "", "| backend | check | result | seconds |",
              "|---|---|---|---|"]  # fmt: skip
    for row in report["checks"]:
        verdict = "pass" if row["ok"] else f"**FAIL**: {row['detail']['error']}"
        lines.append(f"| {row['backend']} | {row['check']} | {verdict} | {row['seconds']:.1f} |")
    if not report["checks"]:
        lines.append("| (none) | no fast backend can run on this device | | |")
    lines += ["", "## Benchmarks (same run)", ""]
    from fastcompress.bench import format_table

    for op in dict.fromkeys(r.op for r in results):
        lines += ["```", format_table([r for r in results if r.op == op]), "```", ""]
    if png:
        lines.append(f"![benchmarks]({os.path.basename(png)})")
    return "\n".join(lines) + "\n"
