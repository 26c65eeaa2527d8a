"""Triton kernels of UniTok's entropy loss (fastcompress/entropy.py has the math), with
their launchers. N x K is never stored.

Logits in base-2 units, one ``tl.dot`` per tile: chunks and codes are padded to D_PAD =
next_pow2(d + 1) (>= 16, the MMA K), code lanes < d = log2(e) (2 / tau) c, and the bias
-log2(e) |c|^2 / tau (stored in code lane d) is added after the dot, so ``l2 = z . c +
bias`` and every exponential is an ``exp2``. Codes past K get the bias -1e30
(probability 0, finite products). Products in IEEE fp32.

- forward, one program per (BLOCK_N rows, codebook): an online pass over the code tiles
  (running max, sum and entropy sum per row), then a second pass for the rows' share of
  the mean probabilities, written per program (a fixed-order sum in torch: no atomics,
  so the result does not depend on scheduling);
- backward rows, one program per (BLOCK_N rows, codebook): m_n = sum_k p_nk w_k, then
  g = coef p (w - m - log p - H) and dz = g (c - mean c) (a ``tl.dot``; sum_k g = 0, and
  the centring keeps far-from-origin codebooks from cancelling);
- backward codes, one program per (BLOCK_K codes, codebook): the same g for its codes,
  row block by row block, into sum_n g z and sum_n g (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Shipped launch configurations (also what the ahead-of-time compile tests check). The
# forward at 64 x 64 with 4 warps spilled 12 bytes on sm_80 (255 registers); 64 x 32
# takes 156. The backward's row kernel at 64 x 64, 8 warps: 186 registers, no spills.
# Its code kernel at the same tile was held to 128 registers by ptxas for sm_80 and
# spilled 16 bytes once the bias came after the dot; 32 rows x 64 codes with 4 warps
# takes 152 on both targets (64 x 64 x 4 warps: 194; 32 x 64 x 8 warps spilled on sm_90).
FORWARD_CONFIG = dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
BACKWARD_CONFIG = dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)
BACKWARD_CODES_CONFIG = dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)
PAD_BIAS = tl.constexpr(-1e30)
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634


@triton.jit
def _logits(z, book, k0, vocab, lanes, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """(rows, BLOCK_K) base-2 logits of codes k0.. and the code tile (BLOCK_K, D_PAD,
    its bias lane zeroed). The bias (-|c|^2, the large term of L2 logits) is added after
    the dot: inside it, the products would round at the bias's size."""
    codes = k0 + tl.arange(0, BLOCK_K)
    code_ok = codes < vocab
    c = tl.load(
        book + codes[:, None].to(tl.int64) * (D + 1) + lanes[None, :],
        mask=code_ok[:, None] & (lanes[None, :] < D),
        other=0.0,
    )
    bias = tl.load(book + codes.to(tl.int64) * (D + 1) + D, mask=code_ok, other=PAD_BIAS)
    return tl.dot(z, tl.trans(c), input_precision="ieee") + bias[None, :], c


@triton.jit
def _load_rows(chunks_ptr, rows, row_ok, g, groups, lanes, D: tl.constexpr):
    """(BLOCK_N, D_PAD) chunks, zero past d."""
    offs = (rows[:, None].to(tl.int64) * groups + g) * D + lanes[None, :]
    return tl.load(chunks_ptr + offs, mask=row_ok[:, None] & (lanes[None, :] < D), other=0.0)


@triton.jit
def entropy_forward_kernel(
    chunks_ptr,
    book_ptr,
    stats_ptr,
    p_sums_ptr,
    h_sums_ptr,
    n_rows,
    vocab,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    blocks = tl.num_programs(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    lanes = tl.arange(0, D_PAD)
    z = _load_rows(chunks_ptr, rows, row_ok, g, groups, lanes, D)
    book = book_ptr + g.to(tl.int64) * vocab * (D + 1)

    # Online pass: T = sum_k e_k (l2_k - max) rescales with the max like the sum does.
    top = tl.full((BLOCK_N,), PAD_BIAS, tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, vocab, BLOCK_K):
        l2, _ = _logits(z, book, k0, vocab, lanes, D, BLOCK_K)
        new_top = tl.maximum(top, tl.max(l2, axis=1))
        alpha = tl.exp2(top - new_top)
        x = l2 - new_top[:, None]
        e = tl.exp2(x)
        t = alpha * (t + (top - new_top) * total) + tl.sum(e * x, axis=1)
        total = alpha * total + tl.sum(e, axis=1)
        top = new_top
    log2_total = tl.log2(total)
    entropy = tl.log(total) - t * LN2 / total
    stat = stats_ptr + (rows.to(tl.int64) * groups + g) * 3
    tl.store(stat, top, mask=row_ok)
    tl.store(stat + 1, log2_total, mask=row_ok)
    tl.store(stat + 2, entropy, mask=row_ok)
    tl.store(h_sums_ptr + g * blocks + pid, tl.sum(tl.where(row_ok, entropy, 0.0), axis=0))

    # Second pass: this block's share of the mean probabilities, per program. (l2 - max)
    # is exact, max + log2 sum as one number would round at large logits.
    sums = p_sums_ptr + (g.to(tl.int64) * blocks + pid) * vocab
    for k0 in range(0, vocab, BLOCK_K):
        l2, _ = _logits(z, book, k0, vocab, lanes, D, BLOCK_K)
        lp2 = (l2 - top[:, None]) - log2_total[:, None]
        p = tl.where(row_ok[:, None], tl.exp2(lp2), 0.0)
        codes = k0 + tl.arange(0, BLOCK_K)
        tl.store(sums + codes, tl.sum(p, axis=0), mask=codes < vocab)


@triton.jit
def _grad_logits(l2, top, log2_total, w, shift, coef):
    """g = coef p (w - shift - ln 2 log2 p) on a (rows, codes) tile."""
    lp2 = (l2 - top[:, None]) - log2_total[:, None]
    p = tl.exp2(lp2)
    return coef * p * (w[None, :] - shift[:, None] - lp2 * LN2), p


@triton.jit
def entropy_backward_rows_kernel(
    chunks_ptr,
    book_ptr,
    stats_ptr,
    w_ptr,
    shift_ptr,
    mean_ptr,
    grad_chunks_ptr,
    n_rows,
    vocab,
    coef,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    lanes = tl.arange(0, D_PAD)
    z = _load_rows(chunks_ptr, rows, row_ok, g, groups, lanes, D)
    book = book_ptr + g.to(tl.int64) * vocab * (D + 1)
    stat = stats_ptr + (rows.to(tl.int64) * groups + g) * 3
    top = tl.load(stat, mask=row_ok, other=0.0)
    log2_total = tl.load(stat + 1, mask=row_ok, other=0.0)
    entropy = tl.load(stat + 2, mask=row_ok, other=0.0)

    mixed = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, vocab, BLOCK_K):
        l2, _ = _logits(z, book, k0, vocab, lanes, D, BLOCK_K)
        codes = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + g * vocab + codes, mask=codes < vocab, other=0.0)
        p = tl.exp2((l2 - top[:, None]) - log2_total[:, None])
        mixed += tl.sum(p * w[None, :], axis=1)
    shift = mixed + entropy
    tl.store(shift_ptr + rows.to(tl.int64) * groups + g, shift, mask=row_ok)

    # dz = sum_k g_k c_k with sum_k g_k = 0: against the codebook's mean code, so that
    # codes far from the origin (L2 codebooks) do not cancel in float32.
    mean = tl.load(mean_ptr + g * D_PAD + lanes)
    dz = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    g_sum = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, vocab, BLOCK_K):
        l2, c = _logits(z, book, k0, vocab, lanes, D, BLOCK_K)
        codes = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + g * vocab + codes, mask=codes < vocab, other=0.0)
        grad, _ = _grad_logits(l2, top, log2_total, w, shift, coef)
        grad = tl.where(row_ok[:, None] & (codes < vocab)[None, :], grad, 0.0)
        dz += tl.dot(grad, c - mean[None, :], input_precision="ieee")
        g_sum += tl.sum(grad, axis=1)
    dz += g_sum[:, None] * mean[None, :]
    offs = (rows[:, None].to(tl.int64) * groups + g) * D + lanes[None, :]
    tl.store(grad_chunks_ptr + offs, dz * LN2, mask=row_ok[:, None] & (lanes[None, :] < D))


@triton.jit
def entropy_backward_codes_kernel(
    chunks_ptr,
    book_ptr,
    stats_ptr,
    w_ptr,
    shift_ptr,
    gz_ptr,
    gs_ptr,
    n_rows,
    vocab,
    coef,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    lanes = tl.arange(0, D_PAD)
    book = book_ptr + g.to(tl.int64) * vocab * (D + 1)
    k0 = pid * BLOCK_K
    codes = k0 + tl.arange(0, BLOCK_K)
    code_ok = codes < vocab
    w = tl.load(w_ptr + g * vocab + codes, mask=code_ok, other=0.0)
    gz = tl.zeros((BLOCK_K, D_PAD), tl.float32)
    gs = tl.zeros((BLOCK_K,), tl.float32)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        z = _load_rows(chunks_ptr, rows, row_ok, g, groups, lanes, D)
        l2, _ = _logits(z, book, k0, vocab, lanes, D, BLOCK_K)
        stat = stats_ptr + (rows.to(tl.int64) * groups + g) * 3
        top = tl.load(stat, mask=row_ok, other=0.0)
        log2_total = tl.load(stat + 1, mask=row_ok, other=0.0)
        shift = tl.load(shift_ptr + rows.to(tl.int64) * groups + g, mask=row_ok, other=0.0)
        grad, _ = _grad_logits(l2, top, log2_total, w, shift, coef)
        grad = tl.where(row_ok[:, None] & code_ok[None, :], grad, 0.0)
        gz += tl.dot(tl.trans(grad), z, input_precision="ieee")
        gs += tl.sum(grad, axis=0)
    out = gz_ptr + (g.to(tl.int64) * vocab + codes[:, None]) * D + lanes[None, :]
    tl.store(out, gz, mask=code_ok[:, None] & (lanes[None, :] < D))
    tl.store(gs_ptr + g * vocab + codes, gs, mask=code_ok)


def _augmented_book(book: Tensor, inv_temp: float) -> Tensor:
    """``(G, K, d + 1)``: log2(e) (2 / tau) c, then the bias -log2(e) |c|^2 / tau."""
    scale = LOG2E * inv_temp
    bias = -scale * book.square().sum(-1, keepdim=True)
    return torch.cat([(2 * scale) * book, bias], -1).contiguous()


def _geometry(chunks: Tensor) -> tuple[int, int, int, int]:
    n, groups, dim = chunks.shape
    return n, groups, dim, max(16, triton.next_power_of_2(dim + 1))


def entropy_forward_triton(chunks: Tensor, book: Tensor, inv_temp: float):
    """(per-sample entropy (G,) float64, mean probabilities (G, K), stats (N, G, 3))."""
    n, groups, dim, d_pad = _geometry(chunks)
    vocab = book.shape[1]
    blocks = triton.cdiv(max(n, 1), FORWARD_CONFIG["BLOCK_N"])
    stats = chunks.new_empty(n, groups, 3)
    p_sums = chunks.new_zeros(groups, blocks, vocab)
    h_sums = chunks.new_zeros(groups, blocks)
    if n:
        entropy_forward_kernel[(blocks, groups)](
            chunks, _augmented_book(book, inv_temp), stats, p_sums, h_sums, n, vocab,
            D=dim, D_PAD=d_pad, **FORWARD_CONFIG,
        )  # fmt: skip
    rows = max(n, 1)
    per_sample = h_sums.sum(1, dtype=torch.float64) / rows
    return per_sample, (p_sums.sum(1, dtype=torch.float64) / rows).float(), stats


def entropy_backward_triton(chunks: Tensor, book: Tensor, w: Tensor, stats: Tensor, inv_temp):
    """Gradients of the loss (unit upstream gradient): ``(grad_chunks, grad_book)``."""
    n, groups, dim, d_pad = _geometry(chunks)
    vocab = book.shape[1]
    grad_chunks = torch.zeros_like(chunks)
    gz = book.new_zeros(groups, vocab, dim)
    gs = book.new_zeros(groups, vocab)
    if n:
        coef = 1.0 / (n * groups)
        book_aug = _augmented_book(book, inv_temp)
        shift = chunks.new_empty(n, groups)
        w = w.contiguous()
        # The mean code per codebook, in the augmented layout (lanes past d: 0).
        mean = torch.nn.functional.pad(book_aug[..., :dim].mean(1), (0, d_pad - dim))
        entropy_backward_rows_kernel[(triton.cdiv(n, BACKWARD_CONFIG["BLOCK_N"]), groups)](
            chunks, book_aug, stats, w, shift, mean.contiguous(), grad_chunks, n, vocab, coef,
            D=dim, D_PAD=d_pad, **BACKWARD_CONFIG,
        )  # fmt: skip
        code_blocks = triton.cdiv(vocab, BACKWARD_CODES_CONFIG["BLOCK_K"])
        entropy_backward_codes_kernel[(code_blocks, groups)](
            chunks, book_aug, stats, w, shift, gz, gs, n, vocab, coef,
            D=dim, D_PAD=d_pad, **BACKWARD_CODES_CONFIG,
        )  # fmt: skip
    grad_book = (2 * inv_temp) * (gz - book * gs[..., None])
    return grad_chunks, grad_book
