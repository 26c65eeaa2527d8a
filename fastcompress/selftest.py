"""``fastcompress selftest``: every backend that can run on a device against the reference,
then the benchmark tables for that device, in one report (JSON, Markdown, PNG).

The same parity checks serve as the on-device probes of ``auto`` (``_probe.py``): each
takes a backend and a device, runs small random problems (odd sizes) through that backend
and the reference, and raises AssertionError with the largest error when they disagree.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import torch

import fastcompress as fc
from fastcompress._parity import code_parity

# Errors allowed against the reference (float32 inputs).
ATOL, RTOL = 2e-5, 1e-4


def _close(name: str, got, want, atol=ATOL, rtol=RTOL) -> float:
    got, want = got.detach().float(), want.detach().float()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"{name}: max |error| {err:.3g} (atol {atol}, rtol {rtol})")
    return err


def _codes_agree(z, books, idx, ref_idx, normalize) -> int:
    """Indices equal except at near-ties (the rule of ``_parity``); returns how many differ."""
    result = code_parity(z, books, idx, ref_idx, normalize)
    if result.failure is not None:
        raise AssertionError(f"mcq: {result.failure}")
    return result.differ


def check_mcq(backend: str, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for normalize in (True, False):
        z0 = torch.randn(301, 64, generator=gen).to(device)
        books0 = torch.randn(8, 130, 8, generator=gen).to(device)
        idx = fc.mcq_search(z0, books0, normalize=normalize, backend=backend)
        ref_idx = fc.mcq_search(z0, books0, normalize=normalize, backend="reference")
        out[f"near_ties_normalize={normalize}"] = _codes_agree(z0, books0, idx, ref_idx, normalize)
        weight = torch.randn(z0.shape, generator=gen).to(device)
        results = {}
        for name in (backend, "reference"):
            z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
            q = fc.mcq_quantize(z, books, normalize=normalize, entropy_temp=0.01, backend=name)
            loss = (q.z_q * weight).sum() + q.vq_loss + q.entropy_loss
            results[name] = (
                q.z_q,
                q.vq_loss,
                q.entropy_loss,
                *torch.autograd.grad(loss, (z, books)),
            )
        same = (idx == ref_idx).all(-1)
        got, want = results[backend], results["reference"]
        _close("mcq z_q", got[0][same], want[0][same])
        for name, g, w in zip(("vq_loss", "entropy_loss", "grad z", "grad codebooks"), got[1:],
                              want[1:], strict=True):  # fmt: skip
            out[f"{name} normalize={normalize}"] = _close(f"mcq {name}", g, w, atol=1e-4)
    return out


def _mha(dim, heads, num_meta, device):
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(device)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    queries = torch.randn(num_meta, dim, device=device, requires_grad=True)
    return (queries, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
            mha.out_proj.bias, heads)  # fmt: skip


def check_compress(backend: str, device: torch.device) -> dict:
    torch.manual_seed(1)
    out = {}
    for stride, grid, dim in ((2, (8, 12), 48), (4, (8, 16), 200)):
        weights = _mha(dim, 4, 3, device)
        x0 = torch.randn(3, grid[0] * grid[1], dim, device=device)
        grads = {}
        for name in (backend, "reference"):
            x = x0.clone().requires_grad_()
            meta, pooled = fc.compress(x, grid, stride, *weights, backend=name)
            loss = meta.square().sum() + pooled.sin().sum()
            grads[name] = (meta, pooled, *torch.autograd.grad(loss, (x, weights[0])))
        for label, g, w in zip(("meta", "pooled", "grad x", "grad queries"), grads[backend],
                               grads["reference"], strict=True):  # fmt: skip
            out[f"{label} s={stride}"] = _close(f"compress {label}", g, w, atol=1e-4)
    return out


def check_decode_attention(backend: str, device: torch.device) -> dict:
    torch.manual_seed(2)
    out = {}
    lengths = torch.tensor([70, 0, 33], dtype=torch.int32, device=device)
    for splits, causal, sq in ((1, False, 1), (3, False, 1), (2, True, 4)):
        q = torch.randn(3, sq, 4, 16, device=device)
        k_cache, v_cache = torch.randn(2, 3, 80, 2, 16, device=device)
        k_new, v_new = torch.randn(2, 3, sq, 2, 16, device=device)
        results = {}
        for name in (backend, "reference"):
            kc, vc = k_cache.clone(), v_cache.clone()
            results[name] = fc.decode_attention(
                q, kc, vc, k=k_new, v=v_new, cache_seqlens=lengths, causal=causal,
                num_splits=splits, return_softmax_lse=True, backend=name,
            ) + (kc,)  # fmt: skip
        got, want = results[backend], results["reference"]
        tag = f"splits={splits} causal={causal}"
        out[f"out {tag}"] = _close("decode out", got[0], want[0])
        finite = torch.isfinite(want[1])
        if not torch.equal(finite, torch.isfinite(got[1])):
            raise AssertionError("decode lse: -inf rows differ from the reference")
        out[f"lse {tag}"] = _close("decode lse", got[1][finite], want[1][finite])
        _close("decode cache append", got[2], want[2], atol=0, rtol=0)
    return out


def check_voco(backend: str, device: torch.device) -> dict:
    torch.manual_seed(3)
    out = {}
    for layout in (fc.VocoLayout(3, 40, 1, 20), fc.VocoLayout(2, 33, 2, 9, "causal")):
        q = torch.randn(2, 4, layout.length, 16, device=device)
        k, v = torch.randn(2, 2, 2, layout.length, 16, device=device)
        got = fc.voco_attention(q, k, v, layout, backend=backend)
        want = fc.voco_attention(q, k, v, layout, backend="reference")
        out[layout.hybrid] = _close("voco", got, want)
    return out


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
    weights = _mha(48, 4, 3, device)
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


PROBES = {
    "mcq": check_mcq,
    "compress": check_compress,
    "decode_attention": check_decode_attention,
    "voco": check_voco,
}
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
    png = bench.plot(results, os.path.join(out_dir, "selftest.png"))
    with open(os.path.join(out_dir, "selftest.md"), "w") as f:
        f.write(format_markdown(report, results, png))
    report["passed"] = all(row["ok"] for row in report["checks"]) and not any(
        r.parity.startswith("FAIL") for r in results
    )
    return report


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
