"""Triton kernels of the multi-codebook search/quantize, with their launchers.

Forward, one program per (BLOCK_N rows, codebook g): load the z chunk once, normalise
it, then sweep the codebook in BLOCK_K tiles with ``tl.dot`` keeping a running
(best, argmax) per row; the chosen row is gathered, the straight-through output and
its squared error written, and the usage histogram updated with atomics. N x K is
never stored.

d = 4 or 8 is below the MMA K of 16, so chunks are padded to D_PAD = next_pow2(d + 1)
(>= 16) and the spare lane d carries the bias: z lane d = 1, code lane d = bias, so one
dot gives ``z.c + bias`` (cosine: 0; L2: -|c|^2/2; codes past K: -inf, which also masks
them). Products run in IEEE fp32 (``input_precision="ieee"``) so that indices agree
with the float32 reference; TF32 would round the inputs to 10 mantissa bits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Shipped launch configuration, also what the ahead-of-time compile tests check. 64x64
# tiles with 8 warps: 180 registers, no spills on sm_80 / sm_90 (64x128 with 4 warps
# spilled 812 bytes on sm_80). Not yet tuned on a GPU (see benchmarks/NOTES.md).
FORWARD_CONFIG = dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)
BACKWARD_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2)


@triton.jit
def load_chunks(z_ptr, offs, mask, NORMALIZE: tl.constexpr):
    """A (rows, D_PAD) tile of z chunks in float32, divided by max(|z|, eps) as
    F.normalize does when NORMALIZE, and the chunks' norms."""
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    if NORMALIZE:
        z = z / tl.maximum(norm, 1e-12)[:, None]
    return z, norm


@triton.jit
def mcq_forward_kernel(
    z_ptr,
    book_ptr,
    bias_ptr,
    idx_ptr,
    zq_ptr,
    counts_ptr,
    err_ptr,
    n_rows,
    vocab,
    channels,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    FULL: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    lanes = tl.arange(0, D_PAD)
    lane_ok = lanes < D
    z_offs = rows[:, None].to(tl.int64) * channels + g * D + lanes[None, :]
    z, _ = load_chunks(z_ptr, z_offs, row_ok[:, None] & lane_ok[None, :], NORMALIZE)
    z_aug = tl.where(lanes[None, :] == D, 1.0, z)

    book = book_ptr + g.to(tl.int64) * vocab * D
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, vocab, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < vocab
        c = tl.load(
            book + codes[:, None] * D + lanes[None, :],
            mask=code_ok[:, None] & lane_ok[None, :],
            other=0.0,
        )
        bias = tl.load(bias_ptr + g * vocab + codes, mask=code_ok, other=float("-inf"))
        c_aug = tl.where(lanes[None, :] == D, bias[:, None], c)
        scores = tl.dot(z_aug, tl.trans(c_aug), input_precision="ieee")
        tile_best = tl.max(scores, axis=1)
        tile_idx = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32) + k0
        # Strict '>': an earlier tile (lower indices) keeps ties.
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    tl.store(idx_ptr + rows.to(tl.int64) * groups + g, best_idx.to(tl.int64), mask=row_ok)
    if FULL:
        mask2 = row_ok[:, None] & lane_ok[None, :]
        q = tl.load(book + best_idx[:, None] * D + lanes[None, :], mask=mask2, other=0.0)
        diff = q - z
        tl.store(zq_ptr + z_offs, (diff + z).to(zq_ptr.dtype.element_ty), mask=mask2)
        err = tl.sum(tl.sum(tl.where(mask2, diff * diff, 0.0), axis=1), axis=0)
        tl.store(err_ptr + g * tl.num_programs(0) + pid, err)
        tl.atomic_add(counts_ptr + g * vocab + best_idx, 1, mask=row_ok)


@triton.jit
def mcq_backward_kernel(
    z_ptr,
    book_ptr,
    idx_ptr,
    grad_zq_ptr,
    grad_loss_ptr,
    grad_z_ptr,
    grad_rows_ptr,
    n_rows,
    vocab,
    channels,
    beta,
    inv_count,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ATOMIC_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    lanes = tl.arange(0, D_PAD)
    mask2 = row_ok[:, None] & (lanes < D)[None, :]
    offs = rows[:, None].to(tl.int64) * channels + g * D + lanes[None, :]
    z, norm = load_chunks(z_ptr, offs, mask2, NORMALIZE)
    denom = tl.maximum(norm, 1e-12)
    idx = tl.load(idx_ptr + rows.to(tl.int64) * groups + g, mask=row_ok, other=0).to(tl.int32)
    book = book_ptr + g.to(tl.int64) * vocab * D
    q = tl.load(book + idx[:, None] * D + lanes[None, :], mask=mask2, other=0.0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_count
    grad = tl.load(grad_zq_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    grad += (beta * scale) * (z - q)
    if NORMALIZE:
        # d/dx of x / max(|x|, eps): project out the radial part where the clamp is off.
        radial = tl.sum(z * grad, axis=1)
        through = (grad - z * radial[:, None]) / denom[:, None]
        grad = tl.where((norm >= 1e-12)[:, None], through, grad / denom[:, None])
    tl.store(grad_z_ptr + offs, grad.to(grad_z_ptr.dtype.element_ty), mask=mask2)
    if ATOMIC_ROWS:  # fast; the order of the float adds varies from run to run
        rows_ptr = grad_rows_ptr + g.to(tl.int64) * vocab * D + idx[:, None] * D + lanes[None, :]
        tl.atomic_add(rows_ptr, scale * (q - z), mask=mask2)
    else:  # one contribution per chunk, (N, G, d); summed by code in a fixed order after
        part = (rows[:, None].to(tl.int64) * groups + g) * D + lanes[None, :]
        tl.store(grad_rows_ptr + part, scale * (q - z), mask=mask2)


def deterministic_codebook_grads() -> bool:
    """Codebook gradients without atomics: when torch's deterministic mode is on
    (``torch.use_deterministic_algorithms(True)``) or FASTCOMPRESS_DETERMINISTIC=1.
    The default is the atomic scatter: faster, but the float adds into a code's row run
    in a different order each run, and they serialise on hot codes."""
    return torch.are_deterministic_algorithms_enabled() or (
        os.environ.get("FASTCOMPRESS_DETERMINISTIC", "0") == "1"
    )


def sorted_segment_sum(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """``out[s] = sum of values[i] with segment[i] == s`` in a fixed order: a stable sort
    by segment, a float64 prefix sum and one difference per segment. No atomics, so the
    bits are the same on every run; float64 keeps the differences exact to float32."""
    order = torch.sort(segment, stable=True).indices
    sorted_segment = segment[order]
    prefix = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                        values[order].double().cumsum(0)])  # fmt: skip
    bounds = torch.arange(num_segments + 1, device=segment.device, dtype=sorted_segment.dtype)
    edges = torch.searchsorted(sorted_segment, bounds)
    return (prefix[edges[1:]] - prefix[edges[:-1]]).to(values.dtype)


def padded_dim(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim + 1))


def _blocks(n: int, vocab: int) -> tuple[int, int]:
    # Small problems (the interpreter tests) get smaller tiles; never below the MMA's 16.
    block_n = min(FORWARD_CONFIG["BLOCK_N"], max(16, triton.next_power_of_2(max(n, 1))))
    block_k = min(FORWARD_CONFIG["BLOCK_K"], max(16, triton.next_power_of_2(vocab)))
    return block_n, block_k


def mcq_forward_triton(z: Tensor, book: Tensor, bias: Tensor, normalize: bool, full: bool):
    """``z (N, C)``, ``book (G, K, d)`` float32 (unit rows for cosine), ``bias (G, K)``.

    Returns ``(indices (N, G) int64, z_q (N, C) or empty, counts (G, K) int64 or empty,
    squared_error (G,) float64 or empty)``."""
    groups, vocab, dim = book.shape
    n = z.shape[0]
    block_n, block_k = _blocks(n, vocab)
    programs = triton.cdiv(n, block_n)
    idx = torch.empty((n, groups), dtype=torch.long, device=z.device)
    z_q = torch.empty_like(z) if full else z.new_empty(1)
    counts = torch.zeros((groups, vocab), dtype=torch.int32, device=z.device)
    err = torch.zeros((groups, max(programs, 1)), dtype=torch.float32, device=z.device)
    if n > 0:
        mcq_forward_kernel[(programs, groups)](
            z,
            book,
            bias,
            idx,
            z_q,
            counts,
            err,
            n,
            vocab,
            z.shape[1],
            D=dim,
            D_PAD=padded_dim(dim),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            NORMALIZE=normalize,
            FULL=full,
            num_warps=FORWARD_CONFIG["num_warps"],
            num_stages=FORWARD_CONFIG["num_stages"],
        )
    if not full:
        return idx, None, None, None
    # Per-program partial sums reduced here in float64: deterministic, unlike atomics.
    return idx, z_q, counts.long(), err.double().sum(1)


def mcq_backward_triton(
    grad_z_q: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebooks: Tensor,
    idx: Tensor,
    beta: float,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``mcq_quantize`` into ``z (N, C)`` and ``codebooks (G, K, d)``."""
    groups, vocab, dim = codebooks.shape
    n = z.shape[0]
    from fastcompress.reference.mcq import normalize_backward as _normalize_backward
    from fastcompress.reference.mcq import split_norm as _split_norm

    book, norm = _split_norm(codebooks.float(), normalize)
    book = book.contiguous()
    grad_z = torch.empty_like(z)
    deterministic = deterministic_codebook_grads()
    if deterministic:
        grad_rows = torch.empty((n, groups, dim), dtype=torch.float32, device=z.device)
    else:
        grad_rows = torch.zeros_like(book)
    block_n = min(BACKWARD_CONFIG["BLOCK_N"], max(16, triton.next_power_of_2(max(n, 1))))
    if n > 0:
        mcq_backward_kernel[(triton.cdiv(n, block_n), groups)](
            z,
            book,
            idx,
            grad_z_q.contiguous(),
            grad_loss.float().reshape(1),
            grad_z,
            grad_rows,
            n,
            vocab,
            z.shape[1],
            float(beta),
            2.0 / (n * dim * groups),
            D=dim,
            D_PAD=padded_dim(dim),
            BLOCK_N=block_n,
            NORMALIZE=normalize,
            ATOMIC_ROWS=not deterministic,
            num_warps=BACKWARD_CONFIG["num_warps"],
            num_stages=BACKWARD_CONFIG["num_stages"],
        )
    if deterministic:
        codes = idx + torch.arange(groups, device=idx.device) * vocab  # (N, G) flat code ids
        grad_rows = sorted_segment_sum(grad_rows.view(-1, dim), codes.view(-1), groups * vocab)
        grad_rows = grad_rows.view(groups, vocab, dim)
    if normalize:
        grad_rows = _normalize_backward(grad_rows, book, norm)
    return grad_z, grad_rows.to(codebooks.dtype)
