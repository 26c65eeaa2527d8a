"""MCQ search and training benchmarks on CPU (2 threads), all implementations in one run.

    pytest benchmarks/test_bench_mcq.py --benchmark-json=bench-results/mcq-cpu.json

Groups: ``mcq_search {config} N={n}`` (fastcompress CPU kernel, torch reference,
UniTok-style torch loop, faiss-cpu ProductQuantizer.compute_codes, vector-quantize-pytorch)
and ``mcq_quantize fwd+bwd {config} N={n}`` (fastcompress vs reference autograd).
"""

import importlib.util

import pytest
import torch
from isa_levels import at_level, cpu_impls

from fastcompress import bench
from fastcompress.reference import mcq_search_reference

CONFIGS = ["unitok", "mgvq"]
SIZES = [16384, 65536]
SEARCH_IMPLS = [
    *cpu_impls(),
    "torch reference",
    "UniTok-style torch",
    "faiss-cpu PQ",
    "vector-quantize-pytorch",
]


def _rounds(seconds: float) -> int:
    return 1 if seconds > 2.0 else (3 if seconds > 0.3 else 10)


@pytest.fixture(scope="module")
def problems():
    return {}


def _problem(problems, config, n):
    if (config, n) not in problems:
        z, books = bench.make_mcq_inputs(config, n)
        problems[(config, n)] = (z, books, mcq_search_reference(z, books))
    return problems[(config, n)]


@pytest.mark.parametrize("impl", SEARCH_IMPLS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_mcq_search(benchmark, record, problems, config, n, impl):
    if impl == "faiss-cpu PQ" and not importlib.util.find_spec("faiss"):
        pytest.skip("faiss-cpu not installed")
    if impl == "vector-quantize-pytorch":
        if not importlib.util.find_spec("vector_quantize_pytorch"):
            pytest.skip("vector-quantize-pytorch not installed")
        if n > 16384:
            pytest.skip(
                "vector-quantize-pytorch materialises h x N x K float32 (8.6 GB at "
                "N=65536, several copies): more than this 24 GB machine"
            )
    z, books, ref = _problem(problems, config, n)
    impls = bench.mcq_search_impls(z, books, peers="all")
    fn, x = impls["fastcompress[cpu]" if impl.startswith("fastcompress[cpu") else impl]
    with at_level(impl):
        idx = torch.as_tensor(fn(x))
        parity = bench.index_parity(idx, ref, z, books)
        assert not parity.startswith("FAIL"), parity
        seconds, peak = bench.measure(lambda: fn(x), z.device, min_seconds=0.0, max_repeats=1)
        benchmark.group = f"mcq_search {config} N={n}"
        record(benchmark, impl, parity, peak)
        benchmark.pedantic(fn, args=(x,), rounds=_rounds(seconds), iterations=1)


@pytest.mark.parametrize("impl", [*cpu_impls(), "torch reference"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_mcq_quantize_train(benchmark, record, config, n, impl):
    z0, books0 = bench.make_mcq_inputs(config, n)
    weight = torch.randn_like(z0)

    def step():
        z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
        if impl == "torch reference":
            from fastcompress.reference import mcq_quantize_reference

            z_q, _, loss, _ = mcq_quantize_reference(z, books)
        else:
            out = bench.fc.mcq_quantize(z, books, backend="cpu")
            z_q, loss = out.z_q, out.vq_loss
        ((z_q * weight).sum() + loss).backward()

    with at_level(impl):
        seconds, peak = bench.measure(step, z0.device, min_seconds=0.0, max_repeats=1)
        benchmark.group = f"mcq_quantize fwd+bwd {config} N={n}"
        record(benchmark, impl, "checked in tests", peak)
        benchmark.pedantic(step, rounds=_rounds(seconds), iterations=1)
