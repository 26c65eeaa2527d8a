"""Blind spots found by mutation testing (issue 16): paths that a broken kernel could
hide behind, code that never executed, and the limits of the Triton launch tables."""

import pytest
import torch

import fastcompress as fc
from fastcompress import _ext
from fastcompress._backend import BackendUnavailableError, triton_available
from fastcompress.mcq import _finish_from_indices, prepare_codebooks
from fastcompress.reference import mcq_quantize_reference, mcq_search_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dim", [2, 4, 8, 16])
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_search_never_needs_its_scalar_safety_net(dim, normalize):
    # The block search rescans the winning block with the scalar chain; a miss runs a
    # full scalar scan that still returns the right code, only 2-3x slower. On random
    # data (odd N and K, tails in both) the fast pass must never miss.
    _ext.load_cpu_extension()
    hits = torch.ops.fastcompress_cpu.mcq_safety_net_hits
    z = torch.randn(1001, 3 * dim)
    books = torch.randn(3, 203, dim)
    before = hits()
    fc.mcq_quantize(z, books, normalize=normalize, backend="cpu")
    fc.mcq_search(z, books, normalize=normalize, backend="cpu")
    assert hits() == before


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_composition_on_cpu(normalize, dtype):
    # The 'cuda' backend is the CUDA search plus this torch composition (z_q, counts,
    # squared error). With the search stubbed by the reference's indices it runs here.
    z = torch.randn(300, 32).to(dtype)
    books = torch.randn(8, 50, 4).to(dtype)
    idx = mcq_search_reference(z, books, normalize)
    book, _ = prepare_codebooks(books, normalize)
    z_q, counts, sq_err = _finish_from_indices(z, book, idx, normalize)
    ref_z_q, ref_idx, ref_loss, ref_counts = mcq_quantize_reference(z, books, 0.25, normalize)
    assert torch.equal(idx, ref_idx) and torch.equal(counts, ref_counts)
    assert z_q.dtype == dtype
    torch.testing.assert_close(z_q, ref_z_q, atol=2e-6 if dtype == torch.float32 else 1e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)  # fmt: skip
    loss = (sq_err.sum() * 1.25 / (300 * 4 * 8)).float()
    torch.testing.assert_close(loss, ref_loss.float(), atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("normalize", [True, False])
def test_deterministic_codebook_gradients_match_the_atomic_ones(monkeypatch, normalize):
    from fastcompress.triton_kernels import mcq as triton_mcq

    z = torch.randn(150, 24, requires_grad=True)
    books = torch.randn(3, 20, 8, requires_grad=True)  # 150 rows on 20 codes: hot codes

    def grads():
        out = fc.mcq_quantize(z, books, normalize=normalize, backend="triton")
        return torch.autograd.grad(out.z_q.square().sum() + out.vq_loss, (z, books))

    assert not triton_mcq.deterministic_codebook_grads()  # the default: atomics
    atomic = grads()
    monkeypatch.setenv("FASTCOMPRESS_DETERMINISTIC", "1")
    assert triton_mcq.deterministic_codebook_grads()
    sorted_grads = grads()
    for a, s in zip(atomic, sorted_grads, strict=True):
        torch.testing.assert_close(s, a, atol=1e-6, rtol=1e-5)
    ref = fc.mcq_quantize(z, books, normalize=normalize, backend="reference")
    want = torch.autograd.grad(ref.z_q.square().sum() + ref.vq_loss, (z, books))
    torch.testing.assert_close(sorted_grads[1], want[1], atol=1e-6, rtol=1e-5)


@needs_triton
def test_sorted_segment_sum_is_order_fixed_and_exact():
    from fastcompress.triton_kernels.mcq import sorted_segment_sum

    values = torch.randn(500, 3)
    segment = torch.randint(0, 37, (500,))
    segment[segment == 5] = 6  # an empty segment
    got = sorted_segment_sum(values, segment, 40)
    want = torch.zeros(40, 3, dtype=torch.float64).index_add_(0, segment, values.double())
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    assert (got[5] == 0).all() and (got[37:] == 0).all()
    assert torch.equal(sorted_segment_sum(values, segment, 40), got)


@needs_triton
def test_triton_shapes_beyond_the_checked_corners_are_refused_or_routed():
    from fastcompress.triton_kernels.compress import MAX_ROWS

    dim, heads = 32, 4
    num_meta = MAX_ROWS // heads + 1  # N_g * heads just past the compile-checked corner
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    queries = torch.randn(num_meta, dim)
    weights = (queries, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
               mha.out_proj.bias, heads)  # fmt: skip
    x = torch.randn(1, 16, dim)
    with pytest.raises(BackendUnavailableError, match="N_g \\* heads <= 32"):
        fc.compress(x, (4, 4), 2, *weights, backend="triton")
    q = torch.randn(1, 1, 64, 128)
    cache = torch.zeros(1, 8, 1, 128)
    with pytest.raises(BackendUnavailableError, match="Triton decode kernel supports"):
        fc.decode_attention(q, cache, cache.clone(), cache_seqlens=4, backend="triton")
