"""The ``fastcompress`` command line (also ``python -m fastcompress``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DESCRIPTION = (
    "fastcompress: fused kernels for visual-token compression. "
    "'demo' is the main job (train, compress, quantise, regenerate), "
    "'info' shows the environment and backends, 'build' builds the C++ extension now, "
    "'bench' times every backend and peer against the torch reference, 'selftest' checks "
    "every backend on a device against the reference and writes a report."
)


def cmd_info(_args) -> int:
    from fastcompress import __version__
    from fastcompress._backend import available_backends, requested_backend
    from fastcompress.bench import machine_info

    print(f"fastcompress {__version__}")
    for key, value in machine_info().items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    print(f"  FASTCOMPRESS_BACKEND: {requested_backend(None)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends for {device.type} tensors:")
        for name, status in available_backends(device).items():
            print(f"  {name:10s} {status}")
    from fastcompress import _probe

    verdicts = _probe.load_verdicts()
    print("GPU parity probes (what 'auto' may use):" + ("" if verdicts else " none recorded"))
    for key, rows in verdicts.items():
        print(f"  {key}")
        for kernel, row in sorted(rows.items()):
            print(f"    {kernel:28s} {'passed' if row['ok'] else 'FAILED: ' + row['error']}")
    return 0


def cmd_build(args) -> int:
    from fastcompress import _ext

    # A build announces itself (what, for which CPU, where, how long) on stderr; a cached
    # or ahead-of-time library is only loaded, and said so.
    start = time.perf_counter()
    ok = _ext.load_cpu_extension(raise_on_error=False, verbose=args.verbose)
    seconds = time.perf_counter() - start
    if not ok:
        print(f"the C++ CPU extension is unavailable after {seconds:.1f} s: {_ext.cpu_error()}")
        return 1
    how = "built" if _ext.built_now() else "loaded (already built)"
    print(f"C++ CPU extension {how} in {seconds:.1f} s: {_ext.cpu_origin()} "
          f"(ISA level {_ext.cpu_isa()})")  # fmt: skip
    return 0


def _no_cuda(device: str | None) -> int | None:
    """Exit status 2 with one line when ``--device cuda`` is asked of a machine without it."""
    if device != "cuda" or torch.cuda.is_available():
        return None
    build = (
        f"a CPU build of torch ({torch.__version__})"
        if torch.version.cuda is None
        else f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no GPU or "
        "driver is visible"
    )
    print(f"fastcompress: --device cuda, but torch sees no CUDA device: {build}", file=sys.stderr)
    return 2


def cmd_bench(args) -> int:
    from fastcompress import bench

    if (status := _no_cuda(args.device)) is not None:
        return status

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    peers = "none" if args.no_peers else args.peers
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, {args.threads} threads, config {args.config}, N = {args.n}")
    start = time.perf_counter()

    def note(name):  # one line per implementation: readable on a terminal and in a log
        if not args.quiet:
            print(f"  [{time.perf_counter() - start:6.1f} s] timing {name}", file=sys.stderr)

    search = bench.bench_mcq_search(args.config, args.n, device, peers, note)
    train = bench.bench_mcq_train(args.config, args.n, device, note)
    tables = [search, train]
    if args.entropy_n > 0:  # UniTok's training loss; the reference's rounds grow with N
        tables.append(
            bench.bench_mcq_train(args.config, args.entropy_n, device, note, entropy_temp=0.01)
        )
    results = []
    for table in tables:
        print(bench.format_table(table))
        print()
        results += table
    path, png = bench.save(results, args.out)
    print(f"results: {path}" + (f", plot: {png}" if png else ""))
    for line in bench.missing_extras(peers, device, png is not None):
        print(line)
    for line in bench.timing_warnings(results):
        print(line, file=sys.stderr)
    failed = [r for r in results if r.parity.startswith("FAIL")]
    return 1 if failed else 0


def cmd_selftest(args) -> int:
    from fastcompress.selftest import run_selftest

    if (status := _no_cuda(args.device)) is not None:
        return status

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = run_selftest(args.device, args.out, args.n, args.quick, progress=print)
    failed = [f"{r['backend']} {r['check']}" for r in report["checks"] if not r["ok"]]
    verdict = "PASSED" if report["passed"] else "FAILED"
    seconds = time.perf_counter() - start
    print(f"selftest {verdict} in {seconds:.0f} s" + (f": {', '.join(failed)}" if failed else ""))
    print(f"report: {args.out}/selftest.md, .json, .png")
    return 0 if report["passed"] else 1


def cmd_demo(args) -> int:
    from fastcompress.demo import format_report, run_demo
    from fastcompress.pipeline import StackConfig

    torch.set_num_threads(args.threads)
    config = StackConfig(dim=args.dim, grid=(args.grid, args.grid), depth=args.depth)
    print(
        f"UniCompress stack on synthetic {args.grid}x{args.grid} token grids, dim {args.dim}, "
        f"{args.threads} threads"
    )
    report = run_demo(args.steps, args.batch, config, args.out, args.seed, not args.quiet)
    print(format_report(report))
    return 0 if report["fast_vs_reference_max_abs_diff"] < 1e-3 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcompress", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "info", help="environment, CPU ISA level and which backends can run"
    ).set_defaults(fn=cmd_info)
    build = sub.add_parser("build", help="build the C++ extension now (otherwise on first use)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(fn=cmd_build)

    bench = sub.add_parser("bench", help="time every backend and peer against the reference")
    bench.add_argument(
        "--config",
        choices=["unitok", "mgvq"],
        default="unitok",
        help="codebook shape: unitok = 8 x 4096 x 8 (default), mgvq = 8 x 2048 x 4",
    )
    bench.add_argument("--n", type=int, default=16384, help="number of feature vectors (16384)")
    bench.add_argument(
        "--entropy-n",
        type=int,
        default=2048,
        help="feature vectors in the fwd+bwd table with the entropy loss (2048; 0: no table)",
    )
    bench.add_argument("--threads", type=int, default=2, help="CPU threads for every impl (2)")
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available"
    )
    bench.add_argument(
        "--peers",
        choices=["none", "faiss", "all"],
        default="faiss",
        help="peers to run beside the reference: faiss-cpu (default), all adds "
        "vector-quantize-pytorch (builds the full h x N x K matrix: ~8 GB at N = 16384)",
    )
    bench.add_argument("--no-peers", action="store_true", help="same as --peers none")
    bench.add_argument("--out", default="bench-results", help="folder for the JSON and PNG")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    bench.set_defaults(fn=cmd_bench)

    selftest = sub.add_parser(
        "selftest", help="every backend on a device against the reference, then benchmarks"
    )
    selftest.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="device to check (cpu)"
    )
    selftest.add_argument("--n", type=int, default=16384, help="feature vectors in the benchmarks")
    selftest.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    selftest.add_argument("--quick", action="store_true", help="no faiss peer in the benchmarks")
    selftest.add_argument("--out", default="selftest-results", help="folder for the report")
    selftest.set_defaults(fn=cmd_selftest)

    demo = sub.add_parser("demo", help="the main job: train, compress, quantise, regenerate")
    demo.add_argument("--steps", type=int, default=300, help="training steps (300)")
    demo.add_argument("--batch", type=int, default=16, help="grids per training step (16)")
    demo.add_argument("--dim", type=int, default=64, help="token width d (64)")
    demo.add_argument("--grid", type=int, default=16, help="grid side H = W (16)")
    demo.add_argument("--depth", type=int, default=2, help="decoder layers (2)")
    demo.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--out", default="demo-results", help="folder for report, figure, checkpoint")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
