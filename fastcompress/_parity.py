"""Index parity with near-ties: the one rule that the tests, the benchmarks and the
selftest (and so the GPU probes) apply to the codes of a search.

Codes equal the reference's exactly, except where two codes' scores are a near-tie for a
float32 search (summation order decides). There, the chosen code's float64 score must be
within ``NEAR_TIE`` of the reference's choice (relative to the score for L2 scores above
1), and at most ``MAX_NEAR_TIE_SHARE`` of the indices may differ at all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

NEAR_TIE = 1e-5
MAX_NEAR_TIE_SHARE = 1e-3


class CodeParity(NamedTuple):
    differ: int  # indices that differ from the reference's
    gap: float  # worst score gap among them (0 when none differ)
    failure: str | None  # why the codes fail the rule, or None


def chosen_scores(z_rows: Tensor, books: Tensor, idx: Tensor, normalize: bool) -> Tensor:
    """Float64 score (larger is better) of the codes ``idx (N, G)`` for each chunk of
    ``z_rows (N, G * d)`` against ``books (G, K, d)``."""
    groups, _, dim = books.shape
    chunks = z_rows.double().reshape(-1, groups, dim)
    book = books.double()
    if normalize:
        chunks, book = F.normalize(chunks, dim=-1), F.normalize(book, dim=-1)
    rows = book[torch.arange(groups, device=book.device), idx.to(book.device)]
    if normalize:
        return (chunks * rows).sum(-1)
    return -(chunks - rows).square().sum(-1)


def code_parity(
    z_rows: Tensor,
    books: Tensor,
    idx: Tensor,
    ref_idx: Tensor,
    normalize: bool,
    tol: float = NEAR_TIE,
    max_share: float = MAX_NEAR_TIE_SHARE,
) -> CodeParity:
    """Compare ``idx`` with ``ref_idx`` (both ``(N, G)``) under the near-tie rule."""
    idx = idx.reshape(ref_idx.shape).to(ref_idx.device)
    differ = idx != ref_idx
    count = int(differ.sum())
    if count == 0:
        return CodeParity(0, 0.0, None)
    z_rows, books = z_rows.to(ref_idx.device), books.to(ref_idx.device)
    got = chosen_scores(z_rows, books, idx, normalize)[differ]
    want = chosen_scores(z_rows, books, ref_idx, normalize)[differ]
    scale = 1.0 if normalize else want.abs().clamp_min(1.0)
    gap = float(((want - got) / scale).abs().max())
    failure = None
    if gap > tol:
        failure = f"{count} indices differ, score gap {gap:.3g} > {tol:g}"
    elif count / differ.numel() > max_share:
        failure = f"{count} of {differ.numel()} indices differ (near-ties, gap {gap:.3g}): too many"
    return CodeParity(count, gap, failure)


# Errors allowed against the reference in the parity cases (float32 inputs).
ATOL, RTOL = 2e-5, 1e-4


def assert_close(
    name: str, got: Tensor, want: Tensor, atol: float = ATOL, rtol: float = RTOL
) -> float:
    """The largest |error| of ``got`` against ``want``; AssertionError naming ``name`` if
    they are not close (the parity cases of the probes and the selftest)."""
    got, want = got.detach().float(), want.detach().float()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"{name}: max |error| {err:.3g} (atol {atol}, rtol {rtol})")
    return err


def codes_agree(z: Tensor, books: Tensor, idx: Tensor, ref_idx: Tensor, normalize: bool) -> int:
    """Indices equal except at near-ties (the rule above); returns how many differ."""
    result = code_parity(z, books, idx, ref_idx, normalize)
    if result.failure is not None:
        raise AssertionError(f"mcq: {result.failure}")
    return result.differ
