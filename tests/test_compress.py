"""UniCompress compressor: fused pooling + meta-token attention against avg_pool2d +
nn.MultiheadAttention, every backend, dtypes, gradients, modules, bad input."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastcompress as fc
from fastcompress import _ext
from fastcompress._backend import triton_available
from fastcompress.nn import GlobalTokenExtractor, MultiCodebookQuantizer, UniCompressor
from fastcompress.reference.compress import compress_reference

compress_mod = importlib.import_module("fastcompress.compress")
BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])


def _problem(
    batch=3, grid=(12, 8), dim=48, heads=4, num_meta=3, bias=True, seed=0, dtype=torch.float32
):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)
    with torch.no_grad():  # non-trivial biases: the key bias must cancel, the value bias not
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    queries = torch.randn(num_meta, dim)
    x = torch.randn(batch, grid[0] * grid[1], dim)
    weights = (
        queries,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.out_proj.weight,
        mha.out_proj.bias,
        heads,
    )
    weights = tuple(w.to(dtype) if isinstance(w, torch.Tensor) else w for w in weights)
    return x.to(dtype), weights, mha


def _expected(x, grid, stride, weights, mha):
    meta = mha(weights[0].expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
    image = x.view(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
    return meta, F.avg_pool2d(image, stride).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_multihead_attention_float32(backend, stride, bias):
    x, weights, mha = _problem(bias=bias)
    meta, pooled = fc.compress(x, (12, 8), stride, *weights, backend=backend)
    want_meta, want_pooled = _expected(x, (12, 8), stride, weights, mha)
    assert meta.shape == (3, 3, 48) and pooled.shape == (3, 96 // stride**2, 48)
    torch.testing.assert_close(meta, want_meta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_token_attention_alone(backend):
    x, weights, mha = _problem(grid=(5, 7))  # T = 35: not a multiple of any tile
    meta = fc.meta_token_attention(x, *weights, backend=backend)
    torch.testing.assert_close(meta, _expected(x, (5, 7), 1, weights, mha)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.isa_independent  # the cpu backend here is ATen code
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_bfloat16_error_at_most_twice_torch(backend):
    x, weights, _ = _problem(dim=64, heads=8, grid=(8, 8))
    want = compress_reference(
        x.double(), (8, 8), 2, *[w.double() if isinstance(w, torch.Tensor) else w for w in weights]
    )
    x16 = x.bfloat16()
    w16 = tuple(w.bfloat16() if isinstance(w, torch.Tensor) else w for w in weights)
    torch_bf16 = compress_reference(x16, (8, 8), 2, *w16)
    ours = fc.compress(x16, (8, 8), 2, *w16, backend=backend)
    for got, base, exact in zip(ours, torch_bf16, want, strict=True):
        assert got.dtype == torch.bfloat16
        err = (got.double() - exact).abs().max().item()
        torch_err = (base.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, weights, mha = _problem()
    wide = torch.cat([x, torch.randn_like(x)], dim=-1)[..., :48]
    assert not wide.is_contiguous()
    meta, pooled = fc.compress(wide, (12, 8), 2, *weights, backend=backend)
    want_meta, want_pooled = _expected(x, (12, 8), 2, weights, mha)
    torch.testing.assert_close(meta, want_meta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gradients_reach_every_weight(backend):
    x, weights, _ = _problem(batch=2, grid=(8, 4))
    leaves_a = [x.clone().requires_grad_()] + [
        w.detach().clone().requires_grad_() if isinstance(w, torch.Tensor) else w for w in weights
    ]
    leaves_b = [x.clone().requires_grad_()] + [
        w.detach().clone().requires_grad_() if isinstance(w, torch.Tensor) else w for w in weights
    ]
    meta_w, pool_w = torch.randn(2, 3, 48), torch.randn(2, 8, 48)
    meta, pooled = fc.compress(leaves_a[0], (8, 4), 2, *leaves_a[1:], backend=backend)
    ((meta * meta_w).sum() + (pooled * pool_w).sum()).backward()
    meta, pooled = compress_reference(leaves_b[0], (8, 4), 2, *leaves_b[1:])
    ((meta * meta_w).sum() + (pooled * pool_w).sum()).backward()
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if isinstance(a, torch.Tensor):
            assert a.grad is not None and a.grad.abs().sum() > 0
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_core_op_gradcheck_float64():
    x = torch.randn(2, 16, 6, dtype=torch.float64, requires_grad=True)
    folded = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, folded):
        context, pooled = compress_mod._meta_context_pool_op(x, folded, 4, 4, 2, "cpu")
        return context, pooled

    assert torch.autograd.gradcheck(f, (x, folded))


def test_opcheck_core_op():
    x = torch.randn(2, 16, 8, requires_grad=True)
    folded = torch.randn(4, 8, requires_grad=True)
    torch.library.opcheck(compress_mod._meta_context_pool_op, (x, folded, 4, 4, 2, "cpu"))
    torch.library.opcheck(compress_mod._meta_context_pool_op, (x, folded, 0, 0, 0, "cpu"))


def test_compile_fullgraph():
    torch._dynamo.reset()
    model = UniCompressor(32, 4, (8, 8), stride=2, num_meta_tokens=4)
    x = torch.randn(2, 64, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled.meta, eager.meta)
    torch.testing.assert_close(compiled.pooled, eager.pooled)


def test_extractor_loads_multihead_attention_state_dict():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    extractor = GlobalTokenExtractor(32, 4, num_tokens=4)
    extractor.attn.load_state_dict(mha.state_dict())
    assert set(extractor.state_dict()) == {"queries"} | {f"attn.{k}" for k in mha.state_dict()}
    x = torch.randn(2, 20, 32)
    want = mha(extractor.queries.expand(2, -1, -1), x, x)[0]
    torch.testing.assert_close(extractor(x), want, rtol=1e-5, atol=1e-5)


def test_unicompressor_dual_representation():
    quantizer = MultiCodebookQuantizer(8 * 64, 32, num_codebooks=8)
    model = UniCompressor(32, 4, (8, 8), stride=2, num_meta_tokens=4, quantizer=quantizer)
    x = torch.randn(2, 64, 32, requires_grad=True)
    out = model(x)
    assert model.num_compressed_tokens == 4 + 16
    assert out.meta.shape == (2, 4, 32) and out.pooled.shape == (2, 16, 32)
    assert out.quantized.indices.shape == (2, 20, 8) and out.quantized.z_q.shape == (2, 20, 32)
    want = fc.mcq_search(torch.cat([out.meta, out.pooled], 1), quantizer.stacked_codebooks())
    assert torch.equal(out.quantized.indices, want)
    (out.quantized.z_q.sum() + out.quantized.vq_loss).backward()
    assert x.grad is not None and model.extractor.queries.grad is not None
    assert quantizer.codebooks[0].vocab_usage_record_times == 1


@pytest.mark.parametrize(
    "grid, stride, match",
    [
        ((10, 8), 4, "not divisible by stride 4"),
        ((8, 8), 3, "stride must be 2 or 4"),
        ((8, 9), 2, "grid 8x9 has 72"),
        ((0, 8), 2, "positive sizes"),
    ],
)
def test_bad_grid(grid, stride, match):
    x, weights, _ = _problem(grid=(10, 8))
    with pytest.raises(ValueError, match=match):
        fc.compress(x, grid, stride, *weights)


def test_bad_weights():
    x, weights, _ = _problem()
    q, w_in, b_in, w_out, b_out, heads = weights
    with pytest.raises(ValueError, match=r"in_proj_weight must have shape \(144, 48\)"):
        fc.compress(x, (12, 8), 2, q, w_in[:100], b_in, w_out, b_out, heads)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(N_g, d=48\)"):
        fc.compress(x, (12, 8), 2, q[:, :40], w_in, b_in, w_out, b_out, heads)
    with pytest.raises(ValueError, match="num_heads=5 must divide d=48"):
        fc.compress(x, (12, 8), 2, q, w_in, b_in, w_out, b_out, 5)
    with pytest.raises(TypeError, match="queries has dtype torch.float64"):
        fc.compress(x, (12, 8), 2, q.double(), w_in, b_in, w_out, b_out, heads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_empty(backend):
    x, weights, _ = _problem()
    x[1, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        fc.compress(x, (12, 8), 2, *weights, backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        fc.compress(x[:0], (12, 8), 2, *weights, backend=backend)


# (batch, grid, dim, heads, num_meta): B = 1 splits each sample's passes over threads;
# d = 40 / 24 leave 16-lane and scalar tails; M = 40 spans two lane groups plus padding;
# T = 320 and 1024 span several 256-token tiles of the context pass.
CPU_KERNEL_SHAPES = [
    (1, (20, 16), 40, 5, 8),
    (5, (4, 12), 24, 3, 3),
    (2, (32, 32), 64, 8, 4),
]


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("shape", CPU_KERNEL_SHAPES, ids=str)
def test_cpu_kernel_matches_torch_folding(shape):
    batch, grid, dim, heads, num_meta = shape
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(batch, grid[0] * grid[1], dim, generator=gen)
    folded = torch.randn(num_meta * heads, dim, generator=gen) * dim**-0.5
    _ext.load_cpu_extension()
    for stride in (0, 2, 4):
        if stride and (grid[0] % stride or grid[1] % stride):
            continue
        context, pooled = torch.ops.fastcompress_cpu.meta_context_pool(x, folded, *grid, stride)
        want_context, want_pooled = compress_mod._context_pool_torch(x, folded, grid, stride)
        torch.testing.assert_close(context, want_context, rtol=1e-5, atol=1e-6)
        assert torch.equal(pooled, want_pooled), "pooling must be bit-identical to avg_pool2d"


def test_cpu_backend_float32_takes_the_kernel(monkeypatch):
    x, weights, mha = _problem(batch=1, grid=(8, 8))

    def torch_path(*args):
        raise AssertionError("the cpu backend must not take the torch folding in float32")

    monkeypatch.setattr(compress_mod, "_context_pool_torch", torch_path)
    meta, pooled = fc.compress(x, (8, 8), 4, *weights, backend="cpu")
    want_meta, want_pooled = _expected(x, (8, 8), 4, weights, mha)
    torch.testing.assert_close(meta, want_meta, rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled, want_pooled)


def test_cpu_kernel_bad_input():
    _ext.load_cpu_extension()
    op = torch.ops.fastcompress_cpu.meta_context_pool
    x, folded = torch.randn(2, 16, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor"):
        op(x.double(), folded, 4, 4, 2)
    with pytest.raises(RuntimeError, match=r"folded must be float32 \(M > 0, d=8\)"):
        op(x, folded[:, :5], 4, 4, 2)
    with pytest.raises(RuntimeError, match="grid 4x2 does not have T=16 tokens"):
        op(x, folded, 4, 2, 2)
    with pytest.raises(
        RuntimeError, match="grid 4x4 is not divisible by stride 3|must be 0, 2 or 4"
    ):
        op(x, folded, 4, 4, 3)


# ------------------------------------------- inference: one C++ call (fold, pass, finish)


def _forbid_custom_op(monkeypatch):
    def custom_op(*args):
        raise AssertionError("no-grad float32 on cpu must take compress_forward")

    monkeypatch.setattr(compress_mod, "_meta_context_pool_op", custom_op)


@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_call_matches_multihead_attention(monkeypatch, stride, bias, batch):
    x, weights, mha = _problem(batch=batch, bias=bias, seed=batch + stride)
    with torch.no_grad():
        want_meta, want_pooled = _expected(x, (12, 8), stride, weights, mha)
        _forbid_custom_op(monkeypatch)
        meta, pooled = fc.compress(x, (12, 8), stride, *weights, backend="cpu")
        attended = fc.meta_token_attention(x, *weights, backend="cpu")
    torch.testing.assert_close(meta, want_meta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attended, want_meta, rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled, want_pooled)


def test_inference_call_non_contiguous_and_nan(monkeypatch):
    x, weights, mha = _problem(batch=2, dim=40, heads=5)
    wide = torch.randn(2, 96, 80)
    wide[..., ::2] = x
    x_strided = wide[..., ::2]
    with torch.no_grad():
        want_meta, want_pooled = _expected(x, (12, 8), 2, weights, mha)
        _forbid_custom_op(monkeypatch)
        meta, pooled = fc.compress(x_strided, (12, 8), 2, *weights)
        torch.testing.assert_close(meta, want_meta, rtol=1e-5, atol=1e-5)
        assert torch.equal(pooled, want_pooled)
        x[1, 7, 0] = float("inf")
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            fc.compress(x, (12, 8), 2, *weights)


def test_gradients_keep_the_custom_op(monkeypatch):
    # Weights that require grad: the autograd-aware custom op, not the inference call.
    x, weights, _ = _problem(batch=2)
    meta, _ = fc.compress(x, (12, 8), 2, *weights, backend="cpu")
    assert meta.grad_fn is not None
    _forbid_custom_op(monkeypatch)
    with pytest.raises(AssertionError, match="must take compress_forward"):
        fc.compress(x, (12, 8), 2, *weights, backend="cpu")


def test_inference_op_opcheck_and_bad_input():
    x, weights, _ = _problem(batch=2)
    weights = [w.detach() if isinstance(w, torch.Tensor) else w for w in weights]
    with torch.no_grad():
        fc.compress(x, (12, 8), 2, *weights, backend="cpu")  # registers the fake
    op = torch.ops.fastcompress_cpu.compress_forward
    torch.library.opcheck(op, (x, *weights, 12, 8, 2))
    bad = list(weights)
    bad[1] = bad[1][:, :40]
    with pytest.raises(RuntimeError, match=r"in_proj_weight must be float32 \(144, 48\)"):
        op(x, *bad, 12, 8, 2)
    with pytest.raises(RuntimeError, match=r"out_proj_bias must be float32 \(48\)"):
        op(x, *weights[:4], weights[4][:3], weights[5], 12, 8, 2)
