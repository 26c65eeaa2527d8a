"""What needs a CUDA GPU: every Triton and CUDA kernel on the device against the reference
(the selftest's checks, generate with a CUDA graph included), and the CUDA MCQ kernel's
tiles past 256 codes with the L2 bias. Skipped without a GPU; ``scripts/gpu_check.sh``
runs them on one (with TRITON_INTERPRET unset, so the kernels are compiled)."""

import pytest
import torch
from helpers import assert_same_codes, make_problem

import fastcompress as fc
from fastcompress._backend import available_backends
from fastcompress.selftest import CHECKS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"
)
CUDA = torch.device("cuda")
# The CUDA C++ backend has MCQ kernels only.
CASES = [("triton", name) for name in CHECKS] + [("cuda", "mcq")]


def _require(backend: str) -> None:
    status = available_backends(CUDA)[backend]
    assert status == "yes", f"{backend} cannot run on this GPU: {status}"


@pytest.mark.parametrize("backend, check", CASES)
def test_every_gpu_kernel_matches_the_reference(backend, check):
    _require(backend)
    CHECKS[check](backend, CUDA)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("vocab", [300, 513, 1000])
@pytest.mark.parametrize("normalize", [False, True])
def test_forced_gpu_search_past_one_tile_of_codes(backend, vocab, normalize):
    # K > 256 and K % 256 != 0: the CUDA kernel's tiles of 256 codes, the last one short,
    # with the L2 bias (normalize=False) where it shifts every score.
    _require(backend)
    z, books = make_problem(777, 8, vocab, 8, seed=vocab)
    z, books = z.to(CUDA), books.to(CUDA)
    idx = fc.mcq_search(z, books, normalize=normalize, backend=backend)
    ref = fc.mcq_search(z, books, normalize=normalize, backend="reference")
    assert_same_codes(z, books, idx, ref, normalize)
    out = fc.mcq_quantize(z, books, normalize=normalize, backend=backend)
    want = fc.mcq_quantize(z, books, normalize=normalize, backend="reference")
    same = (out.indices == want.indices).all(-1)
    torch.testing.assert_close(out.z_q[same], want.z_q[same], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.vq_loss, want.vq_loss, atol=1e-6, rtol=1e-5)


def test_generate_with_a_cuda_graph_matches_eager():
    from fastcompress.nn import ARDecompressor

    torch.manual_seed(0)
    model = ARDecompressor(64, 2, 4, 48).to(CUDA).eval()
    context = torch.randn(3, 12, 64, device=CUDA)
    eager = model.generate(context)
    graphed = model.generate(context, use_cuda_graph=True)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
