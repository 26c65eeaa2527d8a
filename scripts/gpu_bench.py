"""GPU benchmarks for ``scripts/gpu_check.sh``: each op on the device against the torch
reference and ``torch.compile`` of it, as time, achieved FLOP/s or GB/s and the share of
the GPU's FP32 peak or memory bandwidth. Writes ``gpu_bench.json`` and adds its tables
to ``gpu_check.md`` in OUT_DIR.

    python scripts/gpu_bench.py OUT_DIR [--device cpu --quick]

``--device cpu --quick`` runs tiny shapes on the CPU backends: the plumbing check that CI
runs on machines without a GPU (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

import fastcompress as fc
from fastcompress import bench
from fastcompress.reference import mcq_entropy_loss_reference, mcq_search_reference
from fastcompress.reference.compress import compress_reference

# H200 SXM: dense FP32 (non-tensor-core) peak, and the copy bandwidth measured on the
# lent machine (HBM3e's nominal 4.8 TB/s).
PEAK_FP32_TFLOPS = {"H200": 67.0, "H100": 67.0}
PEAK_GBPS = {"H200": 4300.0, "H100": 3000.0}


def _timer(device: torch.device, fn: Callable, reps: int) -> list[float]:
    """Seconds per call (CUDA events on a GPU), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


COMPILE = True  # torch.compile rows (off in the quick CPU plumbing check: minutes of compiling)


def _compiled(fn: Callable) -> Callable | None:
    if not COMPILE:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # no inductor toolchain: the row is left out
        return None


def _peaks(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    key = next((k for k in PEAK_FP32_TFLOPS if k in name), None)
    return (PEAK_FP32_TFLOPS.get(key), PEAK_GBPS.get(key)) if key else (None, None)


def workloads(device: torch.device, quick: bool):
    """(group, {impl: fn}, flops, bytes) per benchmark."""
    sizes = [256] if quick else [16384, 65536]
    for config in ("unitok", "mgvq"):
        for n in sizes:
            z, books = bench.make_mcq_inputs(config, n, device.type)
            groups, vocab, dim = books.shape
            impls = {
                "fastcompress": lambda z=z, b=books: fc.mcq_search(z, b),
                "torch reference": lambda z=z, b=books: mcq_search_reference(z, b),
            }
            compiled = _compiled(lambda z, b: mcq_search_reference(z, b))
            if compiled is not None:
                impls["torch.compile(reference)"] = lambda z=z, b=books, f=compiled: f(z, b)
            yield f"mcq_search {config} N={n}", impls, 2 * n * groups * vocab * dim, None

    n = 256 if quick else 16384
    z0, books0 = bench.make_mcq_inputs("unitok", n, device.type)

    def train(backend, formula=False):
        def step():
            z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
            if formula:
                out = fc.mcq_quantize(z, books, backend="reference")
                loss = out.vq_loss + mcq_entropy_loss_reference(z, books, 0.01)
            else:
                out = fc.mcq_quantize(z, books, entropy_temp=0.01, backend=backend)
                loss = out.vq_loss + out.entropy_loss
            (loss + out.z_q.sum()).backward()

        return step

    groups, vocab, dim = books0.shape
    # Search, entropy forward (two passes) and backward (three): 5 N G K (d + exp) work.
    yield (
        f"mcq_quantize+entropy fwd+bwd unitok N={n}",
        {"fastcompress": train(None), "torch reference": train("reference"),
         "UniTok formula (torch)": train(None, formula=True)},
        2 * n * groups * vocab * dim * 6,
        None,
    )  # fmt: skip

    dim, grid, heads, meta, batch = (64, 8, 4, 4, 2) if quick else (1024, 32, 8, 4, 8)
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(device)
    weights = (torch.randn(meta, dim, device=device), mha.in_proj_weight.detach(),
               mha.in_proj_bias.detach(), mha.out_proj.weight.detach(),
               mha.out_proj.bias.detach(), heads)  # fmt: skip
    x = torch.randn(batch, grid * grid, dim, device=device)
    compiled = _compiled(lambda x: compress_reference(x, (grid, grid), 2, *weights))
    impls = {
        "fastcompress": lambda: fc.compress(x, (grid, grid), 2, *weights),
        "torch reference": lambda: compress_reference(x, (grid, grid), 2, *weights),
    }
    if compiled is not None:
        impls["torch.compile(reference)"] = lambda: compiled(x)
    yield f"compress d={dim} grid={grid}x{grid} B={batch}", impls, None, x.nbytes * 1.25

    batch, s_max, heads, hd = (2, 64, 2, 16) if quick else (8, 1024, 8, 64)
    q = torch.randn(batch, 1, heads, hd, device=device)
    kc, vc = (torch.randn(batch, s_max, heads, hd, device=device) for _ in range(2))
    length = s_max - 1
    impls = {
        "fastcompress": lambda: fc.decode_attention(q, kc, vc, cache_seqlens=length),
        "torch reference": lambda: fc.decode_attention(
            q, kc, vc, cache_seqlens=length, backend="reference"
        ),
    }
    yield f"decode_attention B={batch} S={s_max} H={heads} D={hd}", impls, None, 2 * kc.nbytes

    counts = (1, 16, 1, 8) if quick else (4, 576, 1, 64)
    layout = fc.VocoLayout(*counts)
    heads, hd = (2, 16) if quick else (32, 128)
    qv, kv, vv = (torch.randn(1, heads, layout.length, hd, device=device) for _ in range(3))
    mask = fc.voco_mask(*counts, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls = {
        "fastcompress": lambda: fc.voco_attention(qv, kv, vv, layout),
        "torch reference": lambda: sdpa(qv, kv, vv, attn_mask=mask),
    }
    yield f"voco_attention L={layout.length} H={heads} D={hd}", impls, None, 4 * qv.nbytes


def run(out_dir: pathlib.Path, device: torch.device, quick: bool) -> list[dict]:
    peak_tflops, peak_gbps = _peaks(device)
    rows = []
    for group, impls, flops, nbytes in workloads(device, quick):
        for impl, fn in impls.items():
            row = {"group": group, "impl": impl}
            try:
                times = _timer(device, fn, 3 if quick else 10)
                seconds = statistics.median(times)
                row.update(seconds=seconds, spread=(max(times) - min(times)) / seconds)
                if flops:
                    row["tflops"] = flops / seconds / 1e12
                    if peak_tflops:
                        row["share_of_fp32_peak"] = row["tflops"] / peak_tflops
                if nbytes:
                    row["gbps"] = nbytes / seconds / 1e9
                    if peak_gbps:
                        row["share_of_bandwidth"] = row["gbps"] / peak_gbps
            except Exception as exc:  # one failed row must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        base = next((r for r in rows if r["group"] == row["group"]
                     and r["impl"] == "torch reference" and "seconds" in r), None)  # fmt: skip
        if base and "seconds" in row:
            row["speedup_vs_reference"] = base["seconds"] / row["seconds"]
    (out_dir / "gpu_bench.json").write_text(json.dumps(rows, indent=2))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| workload | impl | time | vs reference | achieved | share of peak |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['impl']} | FAILED: {r['error']} | | | |")
            continue
        achieved = f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r.get('gbps', 0):.0f} GB/s"
        share = r.get("share_of_fp32_peak", r.get("share_of_bandwidth"))
        lines.append(
            f"| {r['group']} | {r['impl']} | {r['seconds'] * 1e3:.3f} ms "
            f"(spread {r['spread']:.0%}) | {r.get('speedup_vs_reference', float('nan')):.1f}x "
            f"| {achieved} | {'' if share is None else f'{share:.1%}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--markdown", type=pathlib.Path, default=None, help="Markdown table (OUT/gpu_check.md)"
    )
    args = parser.parse_args(argv)
    global COMPILE
    COMPILE = not args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.out, torch.device(args.device), args.quick)
    with open(args.markdown or args.out / "gpu_check.md", "a") as f:
        f.write(f"\n## Benchmarks ({args.device})\n\n{markdown(rows)}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if r.get("impl") == "fastcompress" and "speedup_vs_reference" in r]
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(ok)))
        ax.barh([r["group"] for r in ok], [r["speedup_vs_reference"] for r in ok])
        for i, r in enumerate(ok):
            ax.text(r["speedup_vs_reference"], i, f" {r['speedup_vs_reference']:.1f}x", va="center")
        ax.set_xlabel("speed-up of fastcompress over the torch reference (same device, same run)")
        ax.set_xscale("log")
        fig.tight_layout()
        fig.savefig(args.out / "gpu_check.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no gpu_check.png", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
