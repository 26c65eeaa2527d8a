"""Inside ``torch.autocast`` every fastcompress op computes in float32 (issue #14, item 3):
the same indices, losses, outputs and gradients as a float32 run outside autocast, on
every backend, through the functionals, the modules, direct op calls and torch.compile.

The CUDA autocast kernels are checked here for registration; their numbers are checked
on a GPU by ``test_cuda_autocast_matches_float32`` (skipped on a CPU-only machine, not
counted as coverage here) and by ``fastcompress selftest --device cuda``."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_problem

import fastcompress as fc
from fastcompress._backend import triton_available
from fastcompress.nn import GlobalTokenExtractor, MultiCodebookQuantizer
from fastcompress.voco import VocoLayout

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
OPS = (
    "mcq_search",
    "mcq_quantize",
    "mcq_entropy_loss",
    "meta_context_pool",
    "voco_attention",
    "decode_attention",
)
EXACT = dict(atol=1e-6, rtol=1e-6)


def _autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


def _mcq(z, books, backend):
    out = fc.mcq_quantize(z, books, entropy_temp=0.01, backend=backend)
    loss = out.vq_loss + out.entropy_loss + (out.z_q.float() * torch.linspace(-1, 1, 32)).sum()
    return out, torch.autograd.grad(loss, (z, books))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mcq_quantize_under_autocast_is_float32(backend, dtype):
    z, books = make_problem(203, 4, 96, 8, seed=5)
    z = z.view(7, 29, 32).requires_grad_()
    books.requires_grad_()
    want, want_grads = _mcq(z, books, backend)
    with _autocast(dtype):
        got, got_grads = _mcq(z, books, backend)
    assert got.z_q.dtype == torch.float32
    assert torch.equal(got.indices, want.indices)
    for name in ("z_q", "vq_loss", "entropy_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **EXACT)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, **EXACT)


def test_half_features_under_autocast_are_searched_in_float32():
    # A feature map from an autocast linear layer arrives in bf16: the op casts it to
    # float32 (exactly) and returns what a float32 call on the same values returns.
    z, books = make_problem(256, 8, 64, 8, seed=2)
    z16 = z.view(4, 64, 64).bfloat16()
    want = fc.mcq_quantize(z16.float(), books, entropy_temp=0.01)
    with _autocast():
        got = fc.mcq_quantize(z16, books, entropy_temp=0.01)
        searched = fc.mcq_search(z16, books)
    assert got.z_q.dtype == torch.float32
    assert torch.equal(got.indices, want.indices) and torch.equal(searched, want.indices)
    torch.testing.assert_close(got.entropy_loss, want.entropy_loss, **EXACT)


def test_direct_op_calls_under_autocast_are_float32():
    z, books = make_problem(300, 4, 128, 8, seed=9)
    chunks = F.normalize(z.view(-1, 4, 8), dim=-1).requires_grad_()
    unit = F.normalize(books, dim=-1).requires_grad_()
    want = torch.ops.fastcompress.mcq_entropy_loss(chunks, unit, 100.0, "")[0]
    want_grads = torch.autograd.grad(want, (chunks, unit))
    with _autocast():
        got = torch.ops.fastcompress.mcq_entropy_loss(chunks, unit, 100.0, "")[0]
        idx = torch.ops.fastcompress.mcq_search(z.bfloat16(), books, True, "")
        got_grads = torch.autograd.grad(got, (chunks, unit))  # the backward under autocast
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **EXACT)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, **EXACT)
    assert torch.equal(idx, fc.mcq_search(z.bfloat16().float(), books))


def test_module_under_autocast_matches_float32():
    torch.manual_seed(0)
    quantizer = MultiCodebookQuantizer(512, 64, use_entropy_loss=True, num_codebooks=8)
    quantizer.init_vocab(-1.0)
    features = torch.randn(2, 50, 64, requires_grad=True)
    weights = quantizer.stacked_codebooks()
    want = quantizer(features)
    want_grad = torch.autograd.grad(want[1] + want[2], quantizer.parameters())
    with _autocast():
        got = quantizer(features)
    got_grad = torch.autograd.grad(got[1] + got[2], quantizer.parameters())
    assert torch.equal(weights, quantizer.stacked_codebooks())
    for got_value, want_value in zip(got, want, strict=True):
        assert got_value.dtype == want_value.dtype
        torch.testing.assert_close(got_value, want_value, **EXACT)
    for g, w in zip(got_grad, want_grad, strict=True):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compress_under_autocast_is_float32(backend):
    torch.manual_seed(3)
    extractor = GlobalTokenExtractor(48, 4, num_tokens=3, backend=backend)
    x = torch.randn(2, 8 * 12, 48, requires_grad=True)
    args = ((8, 12), 2, *extractor.attention_weights())
    want = fc.compress(x, *args, backend=backend)
    want_grad = torch.autograd.grad(want[0].sum() + want[1].pow(2).sum(), (x, extractor.queries))
    with _autocast():
        got = fc.compress(x, *args, backend=backend)
        module_out = extractor(x)
    got_grad = torch.autograd.grad(got[0].sum() + got[1].pow(2).sum(), (x, extractor.queries))
    for got_value, want_value in zip(got, want, strict=True):
        assert got_value.dtype == torch.float32
        torch.testing.assert_close(got_value, want_value, **EXACT)
    for g, w in zip(got_grad, want_grad, strict=True):
        torch.testing.assert_close(g, w, **EXACT)
    torch.testing.assert_close(module_out, want[0], **EXACT)


@pytest.mark.isa_independent  # the cpu backend here is ATen code
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_ops_under_autocast_are_float32(backend):
    layout = VocoLayout(2, 17, 1, 6)
    q, k, v = (torch.randn(2, 4, layout.length, 16) for _ in range(3))
    want = fc.voco_attention(q, k, v, layout, backend=backend)
    with _autocast():
        got = fc.voco_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend=backend)
    torch.testing.assert_close(
        got,
        fc.voco_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), layout),
        **EXACT,
    )
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # the inputs were bf16

    caches = [torch.randn(2, 12, 2, 16) for _ in range(2)]
    q1, k1, v1 = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    want_caches = [c.clone() for c in caches]
    want = fc.decode_attention(q1, *want_caches, k1, v1, cache_seqlens=5, backend=backend)
    with _autocast():
        got = fc.decode_attention(q1, *caches, k1, v1, cache_seqlens=5, backend=backend)
    torch.testing.assert_close(got, want, **EXACT)
    for cache, want_cache in zip(caches, want_caches, strict=True):
        assert torch.equal(cache, want_cache)  # written in place, in its own dtype


def test_autocast_kernels_registered_for_cpu_and_cuda():
    for name in OPS:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcompress::{name}", key), (
                name,
                key,
            )


def test_compile_under_autocast_without_graph_breaks():
    z, books = make_problem(64, 4, 32, 8, seed=1)
    z = z.view(2, 32, 32)

    def step(z, books):
        with _autocast():
            out = fc.mcq_quantize(z, books, entropy_temp=0.01)
            return out.z_q, out.vq_loss + out.entropy_loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(z, books), step(z, books)
    for got_value, want_value in zip(got, want, strict=True):
        assert got_value.dtype == torch.float32
        torch.testing.assert_close(got_value, want_value, **EXACT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs in selftest too)")
def test_cuda_autocast_matches_float32():
    z, books = make_problem(512, 8, 256, 8, seed=4)
    z, books = z.cuda().requires_grad_(), books.cuda().requires_grad_()
    want = fc.mcq_quantize(z, books, entropy_temp=0.01)
    want_grad = torch.autograd.grad(want.vq_loss + want.entropy_loss, books)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fc.mcq_quantize(z, books, entropy_temp=0.01)
    got_grad = torch.autograd.grad(got.vq_loss + got.entropy_loss, books)[0]
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.entropy_loss, want.entropy_loss, **EXACT)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("direct_op", [False, True])
def test_half_caches_keep_their_dtype_and_the_write(direct_op):
    caches = [torch.randn(2, 12, 2, 16).bfloat16() for _ in range(2)]
    q1 = torch.randn(2, 1, 4, 16).bfloat16()
    k1, v1 = torch.randn(2, 1, 2, 16).bfloat16(), torch.randn(2, 1, 2, 16).bfloat16()
    want_caches = [c.clone() for c in caches]
    want = fc.decode_attention(q1.float(), *want_caches, k1, v1, cache_seqlens=5)
    with _autocast():
        if direct_op:
            lengths = torch.full((2,), 5, dtype=torch.int32)
            got = torch.ops.fastcompress.decode_attention(
                q1, *caches, k1, v1, lengths, 0.25, False, 0, ""
            )[0]
        else:
            got = fc.decode_attention(q1, *caches, k1, v1, cache_seqlens=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **EXACT)
    for cache, want_cache in zip(caches, want_caches, strict=True):
        assert cache.dtype == torch.bfloat16 and torch.equal(cache, want_cache)
    assert torch.equal(caches[0][:, 5], k1[:, 0])  # the new key landed in place
