"""UniCompress compressor on CPU (2 threads): B = 8, 32 x 32 grid, N_g = 4, 8 heads.

Same run: the reference (avg_pool2d + nn.MultiheadAttention), torch.compile of the
reference, the best plain-torch formulation (the folding as einsums), and fastcompress.
extra_info carries FLOPs and bytes: the floor is reading X once (B*T*d*4 bytes); the
folded FLOPs are 4*B*T*M*d (scores + context, M = N_g * heads) against the reference's
4*B*T*d^2 for the K and V projections.
"""

import pytest
import torch
from isa_levels import at_level, cpu_impls

import fastcompress as fc
from fastcompress.reference.compress import compress_folded_einsum, compress_reference

BATCH, GRID, META, HEADS = 8, (32, 32), 4, 8
IMPLS = [*cpu_impls(), "torch reference", "torch.compile(reference)", "einsum folding"]
_compiled = {}


def _problem(dim):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(dim, HEADS, batch_first=True)
    queries = torch.randn(META, dim)
    x = torch.randn(BATCH, GRID[0] * GRID[1], dim)
    weights = (
        queries,
        mha.in_proj_weight.detach(),
        mha.in_proj_bias.detach(),
        mha.out_proj.weight.detach(),
        mha.out_proj.bias.detach(),
        HEADS,
    )
    return x, weights, mha


def _impl(name, mha, stride):
    if name.startswith("fastcompress[cpu"):
        return lambda x, w: fc.compress(x, GRID, stride, *w, backend="cpu")
    if name == "torch reference":

        def reference(x, w):
            meta = mha(w[0].expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
            return meta, fc.pool_compress(x, GRID, stride)

        return reference
    if name == "einsum folding":
        return lambda x, w: compress_folded_einsum(x, GRID, stride, *w)
    key = (stride, mha.embed_dim)
    if key not in _compiled:
        _compiled[key] = torch.compile(
            lambda x, *w: compress_reference(x, GRID, stride, *w), dynamic=False
        )
    return lambda x, w: _compiled[key](x, *w)


def _info(dim, stride):
    tokens = GRID[0] * GRID[1]
    rows = META * HEADS
    return dict(
        bytes_x=BATCH * tokens * dim * 4,
        bytes_out=BATCH * (META + tokens // stride**2) * dim * 4,
        flops_folded=4 * BATCH * tokens * rows * dim,
        flops_reference=4 * BATCH * tokens * dim * dim,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("dim", [64, 256, 1024])
def test_compress_forward(benchmark, record, dim, stride, impl):
    x, weights, mha = _problem(dim)
    fn = _impl(impl, mha, stride)
    with torch.no_grad(), at_level(impl):
        meta, pooled = fn(x, weights)
        want_meta, want_pooled = compress_reference(x, GRID, stride, *weights)
        torch.testing.assert_close(meta, want_meta, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
        benchmark.group = f"compress forward d={dim} s={stride}"
        record(benchmark, impl, "matches reference", None)
        benchmark.extra_info.update(_info(dim, stride))
        benchmark.pedantic(
            fn, args=(x, weights), rounds=30 if dim < 1024 else 10, iterations=1, warmup_rounds=2
        )


@pytest.mark.parametrize("impl", [*cpu_impls(), "torch reference", "einsum folding"])
def test_compress_forward_backward(benchmark, record, impl):
    dim, stride = 1024, 2
    x0, weights0, mha = _problem(dim)

    def step():
        x = x0.clone().requires_grad_()
        weights = [
            w.clone().requires_grad_() if isinstance(w, torch.Tensor) else w for w in weights0
        ]
        if impl == "torch reference":
            meta, pooled = compress_reference(x, GRID, stride, *weights)
        else:
            meta, pooled = _impl(impl, mha, stride)(x, weights)
        (meta.square().sum() + pooled.square().sum()).backward()

    benchmark.group = f"compress fwd+bwd d={dim} s={stride}"
    record(benchmark, impl, "grads checked in tests", None)
    with at_level(impl):
        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
