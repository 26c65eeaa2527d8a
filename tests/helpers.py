"""Shared test helpers: data, tolerance table, index comparison that tolerates near-ties."""

from __future__ import annotations

import torch

from fastcompress import _parity as parity

# Straight-through outputs: float32 must agree to rounding of the normalisation; half
# types are one rounding of the same float32 value, so within one ulp of the type.
TOLERANCE = {
    torch.float32: dict(atol=2e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
}
# The near-tie rule of index comparisons lives in the package (tests, benchmarks and the
# selftest share it).
NEAR_TIE = parity.NEAR_TIE


def make_problem(n, groups, vocab, dim, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups * dim, generator=gen).to(dtype).to(device)
    books = torch.randn(groups, vocab, dim, generator=gen).to(dtype).to(device)
    return z, books


def assert_same_codes(
    z_rows, books, idx, ref_idx, normalize, tol=NEAR_TIE, max_frac=parity.MAX_NEAR_TIE_SHARE
):
    """Indices equal the reference's exactly, except at near-ties, where the chosen
    code's score must be within ``tol`` of the reference's choice."""
    idx, ref_idx = idx.cpu(), ref_idx.cpu()
    assert idx.shape == ref_idx.shape and idx.dtype == torch.long
    result = parity.code_parity(z_rows.cpu(), books.cpu(), idx, ref_idx, normalize, tol, max_frac)
    assert result.failure is None, result.failure


def exact_tie_problem(n, groups, distinct, dim, repeats, normalize, interleave, seed=0):
    """Codebooks whose rows each appear ``repeats`` times, on values where every score is
    exact in float32 whatever the summation order (BLAS kernel, SIMD width, interpreter):
    for L2, small integers; for cosine, rows of four +-1 entries (norm 2, so the unit
    rows are +-0.5 and every product and partial sum is a multiple of 1/4). Ties between
    copies are then exact, and the lowest index must win on every host."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count):
        if not normalize:
            return torch.randint(-3, 4, (count, dim), generator=gen).float()
        support = torch.rand(count, dim, generator=gen).argsort(-1)[:, :4]
        signs = torch.randint(0, 2, (count, 4), generator=gen).float() * 2 - 1
        return torch.zeros(count, dim).scatter_(1, support, signs)

    base = rows(groups * distinct).view(groups, distinct, dim)
    books = base.repeat_interleave(repeats, dim=1) if interleave else base.repeat(1, repeats, 1)
    z = rows(n * groups).view(n, groups * dim)
    return z, books
