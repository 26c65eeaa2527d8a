"""ARDecompressor generation on CPU (2 threads): dim 512, depth 4, 8 heads, a 32 x 32 grid
(1024 tokens), context 260 (4 meta + 256 pooled), batch 1 and 8. Same run: fastcompress
``generate``, the same decoder in plain torch with a static cache (gpt-fast style) and
with HF-style growing caches; the no-cache reference on a 16 x 16 grid (quadratic)."""

import pytest
import torch
from decoder_baselines import generate_plain
from isa_levels import at_level, cpu_impls

from fastcompress.nn import ARDecompressor

DIM, DEPTH, HEADS, CONTEXT = 512, 4, 8, 260
# The fused step is C++: one impl per ISA level ("fastcompress[cpu:avx2]", ...).
IMPLS = [*cpu_impls(), "plain torch static cache", "HF-style growing cache"]


def _model(tokens):
    torch.manual_seed(0)
    return ARDecompressor(DIM, DEPTH, HEADS, tokens).eval()


def _run(impl, model, context, steps):
    if impl.startswith("fastcompress"):
        with at_level(impl):
            return model.generate(context, steps)
    if impl == "no-cache reference":
        return model.generate_reference(context, steps)
    return generate_plain(model, context, steps, growing=impl.startswith("HF"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 8])
def test_generate_1024(benchmark, record, batch, impl):
    model = _model(1024)
    context = torch.randn(batch, CONTEXT, DIM)
    check = _run(impl, model, context, 8)
    torch.testing.assert_close(check, model.generate(context, 8), atol=1e-4, rtol=1e-4)
    benchmark.group = f"generate 1024 tokens batch={batch}"
    record(benchmark, impl, "matches generate (8 steps)", None)
    benchmark.extra_info["cache_bytes_analytic"] = DEPTH * 2 * batch * 1024 * DIM * 4
    benchmark.pedantic(
        _run, args=(impl, model, context, 1024), rounds=1, iterations=1, warmup_rounds=0
    )
    if impl.startswith("fastcompress"):
        assert model.last_cache_bytes == DEPTH * 2 * batch * 1024 * DIM * 4
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median / 1024 * 1e3


@pytest.mark.parametrize(
    "impl", [*cpu_impls()[:1], "plain torch static cache", "no-cache reference"]
)
def test_generate_256_vs_no_cache(benchmark, record, impl):
    model = _model(256)
    context = torch.randn(1, CONTEXT, DIM)
    benchmark.group = "generate 256 tokens batch=1 (16 x 16)"
    record(benchmark, impl, "checked in tests", None)
    benchmark.pedantic(_run, args=(impl, model, context, 256), rounds=1, iterations=1)
