"""Regression tests of issue 26's defects, each reproduced on the code before its fix:
a silent wrong result, crashes, one NaN policy, errors that name the argument."""

import math
import subprocess
import sys

import pytest
import torch

import fastcompress as fc
from fastcompress import _ext
from fastcompress._backend import triton_available
from fastcompress.nn import ARDecompressor, GroupedQuantizer, MultiCodebookQuantizer

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])


def _decode64(q, k_cache, v_cache, lengths, scale):
    """Non-causal decode attention in float64, sample by sample."""
    batch, sq, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.zeros(batch, sq, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        keys = k_cache[b, :n].double().repeat_interleave(group, dim=1)  # (n, H, D)
        values = v_cache[b, :n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("shd,nhd->hsn", q[b].double(), keys) * scale
        out[b] = torch.einsum("hsn,nhd->shd", scores.softmax(-1), values)
    return out


@pytest.mark.isa_independent  # the cpu backend of decode_attention is ATen's flash kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    ["last-dim-strided", "step-last-dim-strided", "transposed-heads", "expanded", "offset-view"],
)
def test_decode_attention_with_any_query_strides(backend, layout):
    # The cpu backend read outside a q whose last dim was not unit-stride (errors up to
    # 1e308 for q = randn(1, 1, 2, 16)[..., ::2]).
    base = torch.randn(2, 3, 4, 16)
    q = {
        "last-dim-strided": base[..., ::2],
        # Sq = 1 (a decode step): the GQA reshape is a view that keeps the stride of 2.
        "step-last-dim-strided": base[:, :1, :, ::2],
        "transposed-heads": torch.randn(2, 4, 3, 8).transpose(1, 2),
        "expanded": torch.randn(1, 3, 4, 8).expand(2, 3, 4, 8),
        "offset-view": base[:, 1:, :, 8:],
    }[layout]
    sq = q.shape[1]
    k_cache, v_cache = torch.randn(2, 11, 2, 8), torch.randn(2, 11, 2, 8)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    out, lse = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=lengths, return_softmax_lse=True, backend=backend
    )
    want = _decode64(q, k_cache, v_cache, lengths, 8**-0.5)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    assert out.shape == (2, sq, 4, 8) and torch.isfinite(lse).all()


@pytest.mark.isa_independent
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["Sq", "B", "H"])
def test_decode_attention_without_queries_is_empty_and_still_appends(backend, empty):
    # Sq = 0 killed the process (SIGFPE) on the cpu backend: run it in a child first.
    shape = {"Sq": (2, 0, 4, 8), "B": (0, 1, 4, 8), "H": (2, 1, 0, 8)}[empty]
    code = (
        "import torch, fastcompress as fc\n"
        f"q = torch.randn{shape}\n"
        f"kc = torch.randn({shape[0]}, 9, 2, 8); vc = torch.randn({shape[0]}, 9, 2, 8)\n"
        f"fc.decode_attention(q, kc, vc, cache_seqlens=5, backend={backend!r})\n"
        "print('survived')"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == 0 and "survived" in child.stdout, (code, child.stderr[-2000:])
    batch = shape[0]
    q = torch.randn(shape)
    k_cache, v_cache = torch.zeros(batch, 9, 2, 8), torch.zeros(batch, 9, 2, 8)
    k, v = torch.randn(batch, 2, 2, 8), torch.randn(batch, 2, 2, 8)
    out, lse = fc.decode_attention(
        q, k_cache, v_cache, k, v, cache_seqlens=3, return_softmax_lse=True, backend=backend
    )
    assert out.shape == shape and lse.shape == (shape[0], shape[2], shape[1])
    torch.testing.assert_close(k_cache[:, 3:5], k)  # the new keys are written all the same
    torch.testing.assert_close(v_cache[:, 3:5], v)


# ----------------------------------------------------------------------- the NaN rule


def _compress_args(d=16, heads=2):
    attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    return {
        "x": torch.randn(2, 16, d),
        "queries": torch.randn(3, d),
        "in_proj_weight": attn.in_proj_weight.detach().clone(),
        "in_proj_bias": attn.in_proj_bias.detach().clone(),
        "out_proj_weight": attn.out_proj.weight.detach().clone(),
        "out_proj_bias": attn.out_proj.bias.detach().clone(),
    }


@pytest.mark.no_kernel  # refused before the kernels, after the backend is chosen
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad", ["x", "queries", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("grad", [False, True])
def test_compress_names_the_argument_holding_nan(backend, bad, value, grad):
    # The cpu backend blamed x for NaN in queries; the reference accepted it.
    args = _compress_args()
    args[bad].view(-1)[1] = value
    if grad:
        args["x"].requires_grad_()
    before = _ext.kernel_calls() if backend == "cpu" else None
    with pytest.raises(ValueError, match=f"{bad} contains NaN or inf"):
        fc.compress(
            args["x"], (4, 4), 2, args["queries"], args["in_proj_weight"],
            args["in_proj_bias"], args["out_proj_weight"], args["out_proj_bias"], 2,
            backend=backend,
        )  # fmt: skip
    if before is not None and bad in ("queries", "in_proj_bias", "out_proj_bias"):
        # The small arguments are checked before any kernel runs (x and the weights are
        # checked inside the kernel's first pass, which raises naming them).
        assert _ext.kernel_calls() == before


@pytest.mark.parametrize("name", ["beta", "entropy_temp"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_mcq_scalars_must_be_finite(name, value):
    z, books = torch.randn(10, 16), torch.randn(2, 7, 8)
    kwargs = {"beta": 0.25, "entropy_temp": 0.01, name: value}
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        fc.mcq_quantize(z, books, **kwargs)
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        MultiCodebookQuantizer(14, 16, num_codebooks=2, **kwargs)
    if name == "beta":
        with pytest.raises(ValueError, match="beta must be finite"):
            GroupedQuantizer(16, 8, beta=value, groups=2)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_attention_scales_must_be_finite(value):
    q, kc, vc = torch.randn(1, 1, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        fc.decode_attention(q, kc, vc, cache_seqlens=3, softmax_scale=value)
    layout = fc.VocoLayout(0, 4, 1, 2)
    qv = torch.randn(1, 2, layout.length, 8)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        fc.voco_attention(qv, qv, qv, layout, softmax_scale=value)


@pytest.mark.isa_independent
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["q", "k", "v", "k_cache"])
def test_decode_attention_nan_is_an_error(backend, bad):
    tensors = {
        "q": torch.randn(2, 1, 4, 8),
        "k": torch.randn(2, 1, 2, 8),
        "v": torch.randn(2, 1, 2, 8),
        "k_cache": torch.randn(2, 9, 2, 8),
    }
    tensors[bad].view(-1)[3] = math.nan
    v_cache = torch.randn(2, 9, 2, 8)
    with pytest.raises(ValueError, match=f"{bad} contains NaN|{bad} or v_cache holds NaN"):
        fc.decode_attention(
            tensors["q"], tensors["k_cache"], v_cache, tensors["k"], tensors["v"],
            cache_seqlens=4, backend=backend,
        )  # fmt: skip


@pytest.mark.isa_independent
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["q", "k", "v"])
def test_voco_attention_nan_is_an_error(backend, bad):
    layout = fc.VocoLayout(1, 4, 1, 2)
    tensors = {name: torch.randn(1, 2, layout.length, 8) for name in "qkv"}
    tensors[bad][0, 1, 2, 3] = math.nan
    with pytest.raises(ValueError, match=f"{bad} contains NaN"):
        fc.voco_attention(tensors["q"], tensors["k"], tensors["v"], layout, backend=backend)


def test_grouped_quantizer_refuses_nan_buffers():
    quantizer = GroupedQuantizer(64, 4, groups=4).train()
    quantizer.embed_prob[1, 2] = math.nan  # a damaged state dict
    before = quantizer.embedding.weight.detach().clone()
    with pytest.raises(ValueError, match="embed_prob contains NaN"):
        quantizer(torch.randn(2, 16, 4, 4))
    assert torch.equal(quantizer.embedding.weight, before)  # nothing re-seeded from NaN


@pytest.mark.parametrize("where", ["blocks.0.qkv.weight", "head.bias", "context"])
@pytest.mark.parametrize("decoder_backend", ["reference", "cpu"])  # refused before either runs
def test_decompressor_names_the_nan_parameter(where, decoder_backend):
    decoder = ARDecompressor(32, 1, 4, 12, context_dim=24, backend=decoder_backend).eval()
    context = torch.randn(2, 5, 24)
    if where == "context":
        context[1, 2, 3] = math.nan
    else:
        with torch.no_grad():
            decoder.get_parameter(where).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=f"ARDecompressor: {where} contains NaN"):
        decoder.generate(context)
    with pytest.raises(ValueError, match=f"ARDecompressor: {where} contains NaN"):
        decoder(torch.randn(2, 12, 32), context)


# ------------------------------------------------------------ errors that name the argument


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fc.decode_attention(torch.randn(1, 1, 2, 8), *[torch.randn(1, 5, 0, 8)] * 2),
         ValueError, "k_cache must have H_kv > 0"),
        (lambda: fc.voco_attention(torch.randn(1, 2, 7, 8), *[torch.randn(1, 0, 7, 8)] * 2,
                                   fc.VocoLayout(0, 4, 1, 2)),
         ValueError, "H_kv > 0"),
        (lambda: fc.mcq_search(torch.randn(4, 0), torch.randn(0, 5, 8)),
         ValueError, r"codebooks must be \(G, K, d\) with G, K, d > 0"),
        (lambda: fc.mcq_dequantize(torch.zeros(3, 2, dtype=torch.long), torch.randn(2, 5, 4),
                                   channel_dim=5),
         ValueError, "channel_dim=5 is out of range"),
        (lambda: fc.mcq_search(torch.randn(4, 16), [torch.randn(5, 8), torch.randn(6, 8)]),
         ValueError, r"codebooks\[1\] is \(6, 8\)"),
        (lambda: GroupedQuantizer(16, 4, groups=2).get_codebook_entry(
            torch.tensor([[[0, 8]]])), ValueError, r"indices must lie in \[0, 8\)"),
        (lambda: torch.ops.fastcompress.mcq_search(torch.randn(4, 16), torch.randn(1, 2, 5, 8),
                                                   True, ""),
         ValueError, "codebooks must have 3 dimensions"),
        (lambda: torch.ops.fastcompress.decode_attention(
            torch.randn(1, 1, 1, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8),
            None, None, torch.zeros(1, dtype=torch.int32), 1.0, False, 0, ""),
         ValueError, "q must have 4 dimensions"),
        (lambda: torch.ops.fastcompress.voco_attention(
            *[torch.randn(1, 1, 2, 7, 8)] * 3, 0, 4, 1, 2, "isolated", False, 1.0, ""),
         ValueError, "q must have 4 dimensions"),
        (lambda: torch.ops.fastcompress.meta_context_pool(
            torch.randn(1, 2, 16, 8), torch.randn(4, 8), 4, 4, 2, ""),
         ValueError, "x must have 3 dimensions"),
        (lambda: torch.ops.fastcompress.mcq_entropy_loss(
            torch.randn(4, 16), torch.randn(2, 5, 8), 100.0, ""),
         ValueError, "chunks must have 3 dimensions"),
        (lambda: torch.ops.fastcompress.mcq_quantize(
            torch.randn(4, 16), torch.randn(2, 5, 8), math.nan, True, ""),
         ValueError, "beta must be finite"),
    ],
)  # fmt: skip
def test_unclear_errors_now_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.fastcompress.mcq_quantize(
            torch.randn(4, 16), torch.randn(2, 5, 8), math.nan, True, ""), "beta must be finite"),
        (lambda: torch.ops.fastcompress.voco_attention(
            *[torch.randn(1, 2, 7, 8)] * 3, 2, 0, 2, 3, "isolated", False, math.inf, ""),
         "scale must be finite"),
    ],
)  # fmt: skip
def test_fakes_check_the_float_arguments_too(call, match):
    # Traced graphs (torch.compile, export) run the fake, not the op: the same error.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match=match):
        call()


def test_decode_attention_with_an_empty_batch_and_lengths():
    # B = 0 ran min() on an empty tensor.
    out = fc.decode_attention(
        torch.randn(0, 1, 2, 8), torch.randn(0, 5, 2, 8), torch.randn(0, 5, 2, 8),
        cache_seqlens=torch.zeros(0, dtype=torch.int32),
    )  # fmt: skip
    assert out.shape == (0, 1, 2, 8)
