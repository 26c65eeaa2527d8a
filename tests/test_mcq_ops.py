"""Parity of every MCQ backend with the reference: indices, outputs, losses, counts."""

import pytest
import torch
from helpers import TOLERANCE, assert_same_codes, exact_tie_problem, make_problem

import fastcompress as fc
from fastcompress._backend import triton_available
from fastcompress.reference import mcq_quantize_reference, mcq_search_reference

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
# (N, G, K, d): UniTok-like and MGVQ-like, odd N, K not a multiple of 16, generic d.
SHAPES = [
    (37, 8, 64, 8),
    (101, 8, 100, 4),
    (64, 4, 33, 8),
    (45, 3, 77, 8),
    (29, 2, 17, 3),
    (16, 2, 48, 16),
]


def _run(backend, fn, *args, **kw):
    return fn(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_search_matches_reference(backend, shape, normalize):
    n, g, k, d = shape
    z, books = make_problem(n, g, k, d, seed=n + k)
    idx = fc.mcq_search(z, books, normalize=normalize, backend=backend)
    ref = mcq_search_reference(z, books, normalize)
    assert_same_codes(z, books, idx, ref, normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_quantize_matches_reference(backend, dtype, normalize):
    z, books = make_problem(77, 8, 130, 8, dtype=dtype, seed=3)
    out = fc.mcq_quantize(z, books, normalize=normalize, backend=backend)
    z_q, idx, loss, counts = mcq_quantize_reference(z, books, 0.25, normalize)
    assert out.z_q.dtype == dtype and out.z_q.shape == z.shape
    assert_same_codes(z, books, out.indices, idx, normalize)
    same = (out.indices == idx).all(-1)
    torch.testing.assert_close(out.z_q[same], z_q[same], **TOLERANCE[dtype])
    torch.testing.assert_close(out.vq_loss, loss, atol=1e-6, rtol=1e-5)
    assert out.usage_counts.shape == (8, 130) and out.usage_counts.sum() == 77 * 8
    if same.all():
        assert torch.equal(out.usage_counts, counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_resolve_to_lowest_index(backend):
    # Every code appears three times; the search must return the first copy.
    z, books = exact_tie_problem(50, 2, 20, 8, 3, normalize=True, interleave=False)
    idx = fc.mcq_search(z, books, backend=backend)
    assert idx.max() < 20
    assert torch.equal(idx, mcq_search_reference(z, books, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_inside_a_code_block_resolve_to_lowest_index(backend, normalize):
    # Adjacent copies (codes 3i, 3i+1, 3i+2 equal) fall in the same 8-code block of the
    # CPU search, whose rescan must still return the first copy; K = 93 leaves a tail.
    z, books = exact_tie_problem(200, 2, 31, 8, 3, normalize=normalize, interleave=True)
    idx = fc.mcq_search(z, books, normalize=normalize, backend=backend)
    assert (idx % 3 == 0).all()
    assert torch.equal(idx, mcq_search_reference(z, books, normalize))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_first_and_non_contiguous(backend):
    books = torch.randn(8, 64, 4)
    x = torch.randn(2, 7, 5, 32)
    z = x.permute(0, 3, 1, 2)  # (B, C, H, W) channel-first, non-contiguous
    assert not z.is_contiguous()
    out = fc.mcq_quantize(z, books, channel_dim=1, backend=backend)
    ref = fc.mcq_quantize(z.contiguous(), books, channel_dim=1, backend="reference")
    assert out.indices.shape == (2, 7, 5, 8) and out.z_q.shape == z.shape
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.z_q, ref.z_q, **TOLERANCE[torch.float32])
    # channel-last with a non-contiguous slice of a wider tensor
    wide = torch.randn(3, 11, 40)[..., 8:40]
    idx = fc.mcq_search(wide, books, backend=backend)
    assert torch.equal(idx, mcq_search_reference(wide.reshape(-1, 32), books).view(3, 11, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_match_reference_autograd(backend, normalize):
    z, books = make_problem(45, 4, 40, 8, seed=7)
    z1, b1 = z.clone().requires_grad_(), books.clone().requires_grad_()
    z2, b2 = z.clone().requires_grad_(), books.clone().requires_grad_()
    weight = torch.randn(45, 32)
    out = fc.mcq_quantize(z1, b1, normalize=normalize, backend=backend)
    ((out.z_q * weight).sum() + 3.0 * out.vq_loss).backward()
    z_q, _, loss, _ = mcq_quantize_reference(z2, b2, 0.25, normalize)
    ((z_q * weight).sum() + 3.0 * loss).backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-6, rtol=1e-4)
    assert b1.grad.abs().sum() > 0 and z1.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", [True, False])
def test_analytic_backward_equals_autograd_float64(normalize):
    from fastcompress.mcq import mcq_backward_torch

    z, books = make_problem(23, 4, 30, 4, dtype=torch.float64, seed=11)
    z.requires_grad_(), books.requires_grad_()
    z_q, idx, loss, _ = mcq_quantize_reference(z, books, 0.25, normalize)
    grad_out, grad_loss = torch.randn_like(z_q), torch.tensor(1.7, dtype=torch.float64)
    want = torch.autograd.grad((z_q, loss), (z, books), (grad_out, grad_loss))
    got = mcq_backward_torch(grad_out, grad_loss, z.detach(), books.detach(), idx, 0.25, normalize)
    for g, w in zip(got, want, strict=False):
        torch.testing.assert_close(g, w, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("normalize", [True, False])
def test_dequantize_gradcheck_float64(normalize):
    # Straight-through and stop-gradient make the quantize backward differ from the true
    # derivative by design, so gradcheck applies where gradients are true: the lookup
    # through the codebook normalisation (and the entropy loss, below). The straight-
    # through path is checked against torch autograd in float64 above.
    _, books = make_problem(1, 2, 9, 3, dtype=torch.float64, seed=5)
    idx = torch.randint(0, 9, (4, 5, 2))
    assert torch.autograd.gradcheck(
        lambda b: fc.mcq_dequantize(idx, b, normalize=normalize), (books.requires_grad_(),)
    )


def test_entropy_loss_matches_dense_reference():
    from fastcompress.reference import mcq_entropy_loss_reference

    z, books = make_problem(300, 4, 50, 8, seed=2)
    z1, b1 = z.clone().requires_grad_(), books.clone().requires_grad_()
    z2, b2 = z.clone().requires_grad_(), books.clone().requires_grad_()
    out = fc.mcq_quantize(z1, b1, entropy_temp=0.01)
    ref = mcq_entropy_loss_reference(z2, b2, 0.01)
    torch.testing.assert_close(out.entropy_loss, ref, atol=1e-5, rtol=1e-5)
    out.entropy_loss.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-6, rtol=1e-4)
    assert z1.grad.abs().sum() > 0


def test_entropy_loss_chunked_passes(monkeypatch):
    from fastcompress import entropy
    from fastcompress.reference import mcq_entropy_loss_reference

    monkeypatch.setattr(entropy, "_CHUNK_ELEMENTS", 7 * 50)  # 7-row tiles, last one short
    z, books = make_problem(64, 2, 50, 4, seed=4)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    out = fc.mcq_quantize(z1, books, entropy_temp=0.05, normalize=False, backend="reference")
    ref = mcq_entropy_loss_reference(z2, books, 0.05, normalize=False)
    torch.testing.assert_close(out.entropy_loss, ref, atol=1e-5, rtol=1e-5)
    out.entropy_loss.backward(), ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-6, rtol=1e-4)


def test_entropy_reference_gradcheck_float64():
    from fastcompress.reference import mcq_entropy_loss_reference

    z, books = make_problem(5, 2, 6, 3, dtype=torch.float64, seed=9)
    assert torch.autograd.gradcheck(
        lambda a, b: mcq_entropy_loss_reference(a, b, 0.5),
        (z.requires_grad_(), books.requires_grad_()),
    )


def test_dequantize_round_trip():
    z, books = make_problem(40, 8, 64, 8, seed=8)
    out = fc.mcq_quantize(z.view(4, 10, 64), books)
    back = fc.mcq_dequantize(out.indices, books)
    torch.testing.assert_close(back, out.z_q, atol=1e-6, rtol=1e-5)
    first = fc.mcq_dequantize(out.indices.permute(0, 1, 2).reshape(4, 10, 8), books)
    assert first.shape == (4, 10, 64)
    cf = fc.mcq_dequantize(out.indices.view(2, 2, 10, 8), books, channel_dim=1)
    assert cf.shape == (2, 64, 2, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    books = torch.randn(8, 32, 8, requires_grad=True)
    z = torch.randn(0, 5, 64, requires_grad=True)
    out = fc.mcq_quantize(z, books, backend=backend)
    assert out.z_q.shape == (0, 5, 64) and out.indices.shape == (0, 5, 8)
    assert out.vq_loss.item() == 0.0 and out.usage_counts.sum() == 0
    (out.z_q.sum() + out.vq_loss).backward()
    assert books.grad is not None and books.grad.abs().sum() == 0


def test_near_tie_rule_accepts_ties_and_rejects_wrong_codes():
    from fastcompress import _parity, bench

    z, books = exact_tie_problem(2000, 2, 20, 8, 2, normalize=True, interleave=False)
    ref = mcq_search_reference(z, books)
    assert _parity.code_parity(z, books, ref, ref, True) == (0, 0.0, None)
    # The twin of a chosen code scores the same: a tie, accepted while rare.
    twin = ref.clone()
    twin[0, 0] = (ref[0, 0] + 20) % 40  # rows k and k + 20 are copies
    assert torch.equal(books[0, twin[0, 0]], books[0, ref[0, 0]])
    assert _parity.code_parity(z, books, twin, ref, True).failure is None
    assert bench.index_parity(twin, ref, z, books).startswith("1 near-ties")
    many = ref.clone()
    many[:, 0] = (ref[:, 0] + 20) % 40  # every row of group 0 "differs": too many
    assert "too many" in _parity.code_parity(z, books, many, ref, True).failure
    wrong = ref.clone()
    wrong[0, 0] = (ref[0, 0] + 1) % 20  # another row: a real score gap
    assert "score gap" in _parity.code_parity(z, books, wrong, ref, True).failure
    assert bench.index_parity(wrong, ref, z, books).startswith("FAIL")
