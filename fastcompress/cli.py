"""``fastcompress`` command line: ``demo`` (the main job), ``info``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def cmd_info(_args) -> int:
    from fastcompress import __version__
    from fastcompress._backend import available_backends, requested_backend
    from fastcompress.bench import machine_info

    print(f"fastcompress {__version__}")
    for key, value in machine_info().items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    print(f"  FASTCOMPRESS_BACKEND: {requested_backend(None)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends for {device.type} tensors:")
        for name, status in available_backends(device).items():
            print(f"  {name:10s} {status}")
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from fastcompress import bench

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, {args.threads} threads, config {args.config}, N = {args.n}")
    results = []
    with tqdm(desc="bench", unit="impl", file=sys.stderr, disable=args.quiet) as bar:

        def progress(name):
            bar.set_postfix_str(name)
            bar.update(1)

        search = bench.bench_mcq_search(args.config, args.n, device, not args.no_peers, progress)
        train = bench.bench_mcq_train(args.config, args.n, device, progress)
    for table in (search, train):
        print(bench.format_table(table))
        print()
        results += table
    path, png = bench.save(results, args.out)
    print(f"results: {path}" + (f", plot: {png}" if png else ""))
    failed = [r for r in results if r.parity.startswith("FAIL")]
    return 1 if failed else 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="environment and which backends can run").set_defaults(fn=cmd_info)
    bench = sub.add_parser("bench", help="time every backend and peer against the reference")
    bench.add_argument("--config", choices=["unitok", "mgvq"], default="unitok")
    bench.add_argument("--n", type=int, default=16384, help="number of feature vectors")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument(
        "--no-peers", action="store_true", help="skip faiss / vector-quantize-pytorch"
    )
    bench.add_argument("--out", default="bench-results", help="folder for the JSON and PNG")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(fn=cmd_bench)
    demo = sub.add_parser("demo", help="train, compress, quantise, regenerate; report + plot")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--grid", type=int, default=16)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-results")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
