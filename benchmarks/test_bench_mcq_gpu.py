"""GPU variant of the MCQ suite: runs only where CUDA is available (skipped elsewhere; it
is a benchmark, not a test). Reports achieved TFLOP/s-equivalent of the search, counting
2 * N * G * K * d FLOPs, against the H200's FP32 peak."""

import pytest
import torch

from fastcompress import bench
from fastcompress._backend import available_backends
from fastcompress.reference import mcq_search_reference

H200_FP32_TFLOPS = 67.0  # dense FP32 (non-tensor-core) peak of an H200 SXM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMPLS = ["reference", "triton", "cuda"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [16384, 65536, 262144])
@pytest.mark.parametrize("config", ["unitok", "mgvq"])
def test_mcq_search_gpu(benchmark, record, config, n, impl):
    device = torch.device("cuda")
    if available_backends(device)[impl] != "yes":
        pytest.skip(available_backends(device)[impl])
    z, books = bench.make_mcq_inputs(config, n, "cuda")
    ref = mcq_search_reference(z, books)
    idx = bench.fc.mcq_search(z, books, backend=impl)
    parity = bench.index_parity(idx, ref, z, books)
    assert not parity.startswith("FAIL"), parity

    def run():
        bench.fc.mcq_search(z, books, backend=impl)
        torch.cuda.synchronize()

    seconds, peak = bench.measure(run, device, min_seconds=0.0, max_repeats=1)
    groups, vocab, dim = books.shape
    tflops = 2 * n * groups * vocab * dim / seconds / 1e12
    benchmark.group = f"gpu mcq_search {config} N={n}"
    record(benchmark, impl, parity, peak)
    benchmark.extra_info.update(tflops=tflops, fraction_of_fp32_peak=tflops / H200_FP32_TFLOPS)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
