"""Shared test helpers: data, tolerance table, index comparison that tolerates near-ties."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Straight-through outputs: float32 must agree to rounding of the normalisation; half
# types are one rounding of the same float32 value, so within one ulp of the type.
TOLERANCE = {
    torch.float32: dict(atol=2e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
}
# Two codes whose scores differ by less than this are a near-tie for a float32 search.
NEAR_TIE = 1e-5


def make_problem(n, groups, vocab, dim, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups * dim, generator=gen).to(dtype).to(device)
    books = torch.randn(groups, vocab, dim, generator=gen).to(dtype).to(device)
    return z, books


def chosen_scores(z_rows, books, idx, normalize):
    """Float64 score (larger is better) of the code ``idx (N, G)`` for each chunk."""
    groups, _, dim = books.shape
    chunks = z_rows.double().reshape(-1, groups, dim)
    book = books.double()
    if normalize:
        chunks, book = F.normalize(chunks, dim=-1), F.normalize(book, dim=-1)
    rows = book[torch.arange(groups), idx.cpu()]
    if normalize:
        return (chunks * rows).sum(-1)
    return -(chunks - rows).square().sum(-1)


def assert_same_codes(z_rows, books, idx, ref_idx, normalize, tol=NEAR_TIE, max_frac=1e-3):
    """Indices equal the reference's exactly, except at near-ties, where the chosen
    code's score must be within ``tol`` of the reference's choice."""
    idx, ref_idx = idx.cpu(), ref_idx.cpu()
    assert idx.shape == ref_idx.shape and idx.dtype == torch.long
    differ = idx != ref_idx
    if not differ.any():
        return
    got = chosen_scores(z_rows.cpu(), books.cpu(), idx, normalize)[differ]
    want = chosen_scores(z_rows.cpu(), books.cpu(), ref_idx, normalize)[differ]
    scale = 1.0 if normalize else want.abs().clamp_min(1.0)
    gap = ((want - got) / scale).abs().max().item()
    assert gap <= tol, f"{int(differ.sum())} indices differ, score gap {gap:.3g} > {tol}"
    assert differ.float().mean().item() <= max_frac, f"{int(differ.sum())} near-ties is too many"
