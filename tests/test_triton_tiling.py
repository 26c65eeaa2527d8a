"""Every Triton kernel once, under the interpreter, at a shape that runs every tiling
loop of its shipped launch configuration: several d chunks, several splits, several
tiles per split and partial tiles. Each test first asserts that its shape really does
(so a change of the launch tables cannot quietly make it trivial), then compares with
the reference. A kernel that ignores a tile or chunk offset fails here (the review's
mutation of the compressor's pooled store, for one)."""

import pytest
import torch
import triton

import fastcompress as fc
from fastcompress._backend import triton_available
from fastcompress.reference import mcq_search_reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def _mha_weights(dim, heads, num_meta):
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    queries = torch.randn(num_meta, dim)
    weights = (queries, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight)
    return (*weights, mha.out_proj.bias, heads), mha


@pytest.mark.parametrize("stride", [2, 4])
def test_compressor_every_d_chunk_and_split(stride):
    from fastcompress.triton_kernels.compress import launch_config

    batch, grid, dim, heads, num_meta = 2, (8, 32), 200, 4, 3
    blocks, _ = launch_config(grid[1], stride, dim, num_meta * heads, True)
    d_chunks = triton.cdiv(dim, blocks["BLOCK_D"])
    tiles = grid[0] * grid[1] // (stride * grid[1])
    assert d_chunks >= 2 and dim % blocks["BLOCK_D"], blocks  # several chunks, last partial
    assert tiles >= 2
    x = torch.randn(batch, grid[0] * grid[1], dim)
    weights, _ = _mha_weights(dim, heads, num_meta)
    want = fc.compress(x, grid, stride, *weights, backend="reference")
    got = fc.compress(x, grid, stride, *weights, backend="triton")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_meta_attention_partial_token_tiles_and_d_chunks():
    from fastcompress.triton_kernels.compress import ATTENTION_TILE, launch_config

    batch, tokens, dim, heads, num_meta = 2, 150, 72, 4, 2
    blocks, _ = launch_config(ATTENTION_TILE, 0, dim, num_meta * heads, True)
    assert tokens % ATTENTION_TILE and tokens > 2 * ATTENTION_TILE  # 3 tiles, last partial
    assert triton.cdiv(dim, blocks["BLOCK_D"]) >= 2
    x = torch.randn(batch, tokens, dim)
    weights, _ = _mha_weights(dim, heads, num_meta)
    want = fc.meta_token_attention(x, *weights, backend="reference")
    got = fc.meta_token_attention(x, *weights, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("normalize", [True, False])
def test_mcq_several_row_and_code_tiles(normalize):
    from fastcompress.triton_kernels.mcq import FORWARD_CONFIG

    n, groups, vocab, dim = 150, 3, 150, 8
    assert n > 2 * FORWARD_CONFIG["BLOCK_N"] and n % FORWARD_CONFIG["BLOCK_N"]
    assert vocab > 2 * FORWARD_CONFIG["BLOCK_K"] and vocab % FORWARD_CONFIG["BLOCK_K"]
    z = torch.randint(-4, 5, (n, groups * dim)).float()  # integer: exact L2 scores
    books = (
        torch.randn(groups, vocab, dim)
        if normalize
        else torch.randint(-4, 5, (groups, vocab, dim)).float()
    )
    z.requires_grad_()
    books.requires_grad_()
    out = fc.mcq_quantize(z, books, normalize=normalize, backend="triton")
    ref = fc.mcq_quantize(z, books, normalize=normalize, backend="reference")
    if normalize:
        from helpers import assert_same_codes

        assert_same_codes(z.detach(), books.detach(), out.indices, ref.indices, True)
    else:
        assert torch.equal(out.indices, mcq_search_reference(z.detach(), books.detach(), False))
    torch.testing.assert_close(out.z_q, ref.z_q, atol=2e-6, rtol=1e-5)
    weight = torch.randn_like(z)
    grads = torch.autograd.grad((out.z_q * weight).sum() + out.vq_loss, (z, books))
    want = torch.autograd.grad((ref.z_q * weight).sum() + ref.vq_loss, (z, books))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_decode_several_splits_tiles_and_partial_tiles():
    from fastcompress.triton_kernels.decode_attention import launch_constexprs

    batch, s_max, heads, kv_heads, dim, splits = 2, 600, 4, 2, 16, 2
    block_n = launch_constexprs(heads, kv_heads, 1, dim, False)["BLOCK_N"]
    lengths = torch.tensor([600, 437], dtype=torch.int32)
    chunk = triton.cdiv(s_max, splits)
    assert chunk > block_n and chunk % block_n  # two tiles per split, the last partial
    q = torch.randn(batch, 1, heads, dim)
    k_cache, v_cache = torch.randn(2, batch, s_max, kv_heads, dim)
    want = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=lengths, return_softmax_lse=True, backend="reference"
    )
    got = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=lengths, num_splits=splits, return_softmax_lse=True,
        backend="triton",
    )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("hybrid", ["isolated", "causal"])
def test_voco_several_row_and_key_tiles(hybrid):
    from fastcompress.triton_kernels.voco import BLOCK_M, BLOCK_N

    layout = fc.VocoLayout(3, 70, 1, 40, hybrid)
    assert layout.n_hybrid > 2 * BLOCK_N and layout.n_text > 2 * BLOCK_M
    q = torch.randn(1, 4, layout.length, 16)
    k, v = torch.randn(2, 1, 2, layout.length, 16)
    want = fc.voco_attention(q, k, v, layout, backend="reference")
    got = fc.voco_attention(q, k, v, layout, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
