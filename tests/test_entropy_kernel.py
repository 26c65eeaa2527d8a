"""The fused entropy loss (issue 21): every backend (the C++ one at every ISA level)
against a float64 evaluation of UniTok's formula, its vector exp2 against float64, the
shapes that reach every tail, half-precision features, determinism."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_problem

import fastcompress as fc
from fastcompress import _ext
from fastcompress._backend import triton_available
from fastcompress.nn import MultiCodebookQuantizer
from fastcompress.reference import mcq_entropy_loss_reference

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
HAS_EXT = _ext.load_cpu_extension(raise_on_error=False)


def _against_float64(z, books, temp, normalize, backend):
    """(loss error, grad z error, grad codebooks error), relative to float64 UniTok."""
    z1, b1 = z.clone().requires_grad_(), books.clone().requires_grad_()
    out = fc.mcq_quantize(z1, b1, entropy_temp=temp, normalize=normalize, backend=backend)
    out.entropy_loss.backward()
    z2, b2 = z.double().requires_grad_(), books.double().requires_grad_()
    want = mcq_entropy_loss_reference(z2, b2, temp, normalize)
    want.backward()

    def rel(got, ref):
        return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    loss_err = abs(float(out.entropy_loss) - float(want)) / max(abs(float(want)), 1e-30)
    return loss_err, rel(z1.grad, z2.grad), rel(b1.grad, b2.grad)


# (N, G, K, d): UniTok-like, K with an odd tail past the vector width, K = 1, generic d,
# N = 3, N not a multiple of the row block, enough rows for many row chunks.
SHAPES = [
    (37, 8, 130, 8),
    (29, 2, 77, 4),
    (9, 3, 1, 8),
    (20, 2, 33, 5),
    (3, 1, 40, 16),
    (13, 2, 300, 3),
    (1100, 1, 24, 8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temp", [0.05, 0.7])
def test_loss_and_gradients_match_float64_unitok(backend, shape, normalize, temp):
    n, groups, vocab, dim = shape
    if backend == "triton" and n > 200:
        n = 150  # the interpreter runs programs one by one
    z, books = make_problem(n, groups, vocab, dim, seed=n + vocab + dim)
    if not normalize:  # L2: distances of order one whatever d (else a one-hot softmax)
        z, books = z / dim**0.5, books / dim**0.5
    loss_err, gz_err, gb_err = _against_float64(z, books, temp, normalize, backend)
    # Issue 21: loss within 1e-5, gradients within 1e-4 of float64 (relative).
    assert loss_err < 1e-5, loss_err
    assert gz_err < 1e-4 and gb_err < 1e-4, (gz_err, gb_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unitok_temperature_over_a_large_codebook(backend):
    # UniTok's tau = 0.01 over 1024 unit codes: a sharp but not one-hot softmax (with a
    # few dozen codes it is one-hot, and the gradients are round-off).
    z, books = make_problem(96 if backend == "triton" else 300, 2, 1024, 8, seed=11)
    loss_err, gz_err, gb_err = _against_float64(z, books, 0.01, True, backend)
    assert loss_err < 1e-5 and gz_err < 1e-4 and gb_err < 1e-4, (loss_err, gz_err, gb_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_keep_their_precision(backend):
    # L2 codes and features on a sphere of radius 30, close together: logits of ~1300
    # whose spread is a few units. log p must come from (l - max) - log S (each exact),
    # not from l - (max + log S), which rounds at this size. The yardstick is UniTok's
    # formula evaluated by torch in float32: at most twice its error.
    gen = torch.Generator().manual_seed(0)
    n, groups, vocab, dim, radius = 40, 2, 70, 8, 30.0
    centre = F.normalize(torch.randn(groups, dim, generator=gen), dim=-1)
    noise = torch.randn(groups, vocab, dim, generator=gen)
    books = radius * F.normalize(centre[:, None] + 0.03 * noise, dim=-1)
    noise = torch.randn(n, groups, dim, generator=gen)
    z = (radius * F.normalize(centre[None] + 0.03 * noise, dim=-1)).reshape(n, groups * dim)
    errors = _against_float64(z, books, 1.0, False, backend)
    z1, b1 = z.clone().requires_grad_(), books.clone().requires_grad_()
    torch_loss = mcq_entropy_loss_reference(z1, b1, 1.0, False)
    torch_loss.backward()
    z2, b2 = z.double().requires_grad_(), books.double().requires_grad_()
    want = mcq_entropy_loss_reference(z2, b2, 1.0, False)
    want.backward()
    yardstick = (
        abs(float(torch_loss) - float(want)) / abs(float(want)),
        float((z1.grad.double() - z2.grad).abs().max() / z2.grad.abs().max()),
        float((b1.grad.double() - b2.grad).abs().max() / b2.grad.abs().max()),
    )
    for got, torch_err in zip(errors, yardstick, strict=True):
        assert got <= 2 * torch_err + 1e-6, (errors, yardstick)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_gives_zero_loss(backend):
    # With one row the batch-mean distribution is the row's own: the two entropies cancel
    # (up to UniTok's 1e-7 inside the log).
    z, books = make_problem(1, 3, 50, 8, seed=1)
    out = fc.mcq_quantize(z, books, entropy_temp=0.01, backend=backend)
    assert abs(float(out.entropy_loss)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    z, books = torch.randn(0, 16, requires_grad=True), torch.randn(2, 9, 8, requires_grad=True)
    out = fc.mcq_quantize(z, books, entropy_temp=0.01, backend=backend)
    assert float(out.entropy_loss) == 0.0
    out.entropy_loss.backward()
    assert z.grad.shape == (0, 16) and not books.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features(backend, dtype):
    # The loss runs in float32 on the half-precision values (as UniTok's float32 quantizer
    # does): compare with float64 on the same rounded inputs.
    z, books = make_problem(50, 4, 90, 8, seed=3)
    z = z.to(dtype)
    z1 = z.clone().requires_grad_()
    out = fc.mcq_quantize(z1, books, entropy_temp=0.01, backend=backend)
    out.entropy_loss.backward()
    z2 = z.double().requires_grad_()
    want = mcq_entropy_loss_reference(z2, books.double(), 0.01)
    want.backward()
    assert out.entropy_loss.dtype == torch.float32
    assert abs(float(out.entropy_loss) - float(want)) < 1e-5 * abs(float(want))
    assert z1.grad.dtype == dtype
    torch.testing.assert_close(z1.grad.double(), z2.grad, atol=1e-2 * float(z2.grad.abs().max()),
                               rtol=1e-2)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_autocast(backend):
    torch.manual_seed(0)
    quantizer = MultiCodebookQuantizer(8 * 64, 64, num_codebooks=8, use_entropy_loss=True,
                                       backend=backend)  # fmt: skip
    features = torch.randn(2, 30, 64)
    want = quantizer(features.bfloat16().float())[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = quantizer(features.bfloat16())[2]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
@pytest.mark.parametrize("backend", ["cpu"])
def test_cpu_results_do_not_depend_on_the_thread_count(backend):
    z, books = make_problem(1000, 4, 200, 8, seed=8)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            z1, b1 = z.clone().requires_grad_(), books.clone().requires_grad_()
            out = fc.mcq_quantize(z1, b1, entropy_temp=0.01, backend=backend)
            out.entropy_loss.backward()
            results.append((out.entropy_loss, z1.grad, b1.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
@pytest.mark.cpu_kernels
def test_vector_exp2_is_within_its_stated_bound():
    # simd.h: relative error at most 1.0e-7 (0.85 ulp) on [-126, 0]; 2^-126 times the
    # polynomial below (never 0, never subnormal); NaN stays NaN.
    x = torch.cat([torch.linspace(-126, 0, 1_000_003), -torch.rand(100_000) * 126])
    got = torch.ops.fastcompress_cpu.simd_exp2(x).double()
    want = torch.exp2(x.double())
    assert float(((got - want).abs() / want).max()) < 1.2e-7
    low = torch.ops.fastcompress_cpu.simd_exp2(torch.tensor([-127.0, -1e30, -200.5]))
    assert torch.all(low == low[0]) and 1.1e-38 < float(low[0]) < 1.3e-38
    assert torch.isnan(torch.ops.fastcompress_cpu.simd_exp2(torch.tensor([float("nan")]))).all()


def test_bad_temperature_and_arguments():
    z, books = torch.randn(5, 16), torch.randn(2, 9, 8)
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError, match="entropy_temp must be > 0"):
            fc.mcq_quantize(z, books, entropy_temp=temp)
    with pytest.raises(ValueError, match="inv_temp"):
        torch.ops.fastcompress.mcq_entropy_loss(z.view(5, 2, 8), books, -1.0, "")
