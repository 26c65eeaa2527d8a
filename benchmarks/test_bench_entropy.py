"""The entropy loss (issue 21) on CPU (2 threads), every implementation in one run.

    pytest benchmarks/test_bench_entropy.py --benchmark-json=bench-results/entropy-cpu.json

Groups ``mcq_quantize+entropy fwd {config} N={n}`` and ``... fwd+bwd ...``: fastcompress
at every ISA level (``mcq_quantize(..., entropy_temp=0.01)``), the torch reference
backend (row-chunked, no N x K) and UniTok's formula in torch (``get_entropy_loss``: the
dense N x K matrix per codebook, plus the same search), all on the same inputs.
"""

import pytest
from isa_levels import at_level, cpu_impls

from fastcompress import bench
from fastcompress.reference import mcq_entropy_loss_reference

CONFIGS = ["unitok", "mgvq"]
SIZES = [2048, 16384]
IMPLS = [*cpu_impls(), "torch reference", "UniTok formula (torch)"]
TEMP = 0.01


def _rounds(seconds: float) -> int:
    return 1 if seconds > 2.0 else (3 if seconds > 0.3 else 10)


def _step(impl: str, z0, books0, backward: bool):
    def step():
        z = z0.clone().requires_grad_(backward)
        books = books0.clone().requires_grad_(backward)
        if impl == "UniTok formula (torch)":
            out = bench.fc.mcq_quantize(z, books, backend="reference")
            loss = out.vq_loss + mcq_entropy_loss_reference(z, books, TEMP)
        else:
            backend = "reference" if impl == "torch reference" else "cpu"
            out = bench.fc.mcq_quantize(z, books, entropy_temp=TEMP, backend=backend)
            loss = out.vq_loss + out.entropy_loss
        if backward:
            loss.backward()
        return loss

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_mcq_quantize_with_entropy(benchmark, record, config, n, backward, impl):
    if impl == "UniTok formula (torch)" and n > 2048:
        pytest.skip("UniTok's formula builds G x N x K float32 twice (4.3 GB at N = 16384)")
    z0, books0 = bench.make_mcq_inputs(config, n)
    step = _step(impl, z0, books0, backward)
    with at_level(impl):
        want = _step("UniTok formula (torch)", z0[:256], books0, False)()
        got = _step(impl, z0[:256], books0, False)()
        parity = f"loss rel err {abs(float(got) - float(want)) / abs(float(want)):.1e}"
        seconds, peak = bench.measure(step, z0.device, min_seconds=0.0, max_repeats=1)
        benchmark.group = f"mcq_quantize+entropy {'fwd+bwd' if backward else 'fwd'} {config} N={n}"
        record(benchmark, impl, parity, peak)
        benchmark.pedantic(step, rounds=_rounds(seconds), iterations=1)
