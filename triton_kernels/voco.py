"""Triton kernel of the VoCo decoupled-mask attention, with its launcher.

A region of query rows attends to up to three contiguous key spans, the last one causal
(key j visible to row i when j <= i); see ``VocoLayout.regions``. One program per
(batch * head, block of rows) walks the spans' key tiles with an online softmax, so keys
outside the spans (the hybrid block, for text rows) are never read. IEEE fp32 products.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastcompress.triton_kernels.online_softmax import online_softmax_step

BLOCK_M = 16
BLOCK_N = 32
NUM_WARPS = 8  # 4 warps spilled up to 1.6 KiB on sm_90 at D = 128


@triton.jit
def _span(
    q,
    acc,
    m_i,
    l_i,
    k_base,
    v_base,
    rows,
    start,
    end,
    stride_l,
    CAUSAL: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    scale,
):
    lanes = tl.arange(0, D_PAD)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        ok = keys < end
        # 64-bit: key * stride passes 2^31 elements in long caches (L * H_kv * D).
        offs = keys[:, None].to(tl.int64) * stride_l + lanes[None, :]
        mask = ok[:, None] & (lanes < D)[None, :]
        k = tl.load(k_base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i)
    return acc, m_i, l_i


@triton.jit
def segment_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    row_start,
    row_end,
    a0,
    a1,
    b0,
    b1,
    c0,
    c1,
    scale,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    o_stride_b,
    o_stride_h,
    o_stride_l,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HEADS
    h = bh % HEADS
    kvh = h // (HEADS // KV_HEADS)
    rows = row_start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    lanes = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (lanes < D)[None, :]
    # Every offset product in 64 bits: row * stride and head * stride pass 2^31 elements
    # once L * H * D per sample does (e.g. 512k tokens x 32 heads x 128).
    rows64 = rows.to(tl.int64)
    q_base = q_ptr + b.to(tl.int64) * q_stride_b + h.to(tl.int64) * q_stride_h
    q = tl.load(q_base + rows64[:, None] * q_stride_l + lanes[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    k_base = k_ptr + b.to(tl.int64) * k_stride_b + kvh.to(tl.int64) * k_stride_h
    v_base = v_ptr + b.to(tl.int64) * k_stride_b + kvh.to(tl.int64) * k_stride_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    acc, m_i, l_i = _span(
        q, acc, m_i, l_i, k_base, v_base, rows, a0, a1, k_stride_l, False, D, D_PAD, BLOCK_N, scale
    )
    acc, m_i, l_i = _span(
        q, acc, m_i, l_i, k_base, v_base, rows, b0, b1, k_stride_l, False, D, D_PAD, BLOCK_N, scale
    )
    acc, m_i, l_i = _span(
        q, acc, m_i, l_i, k_base, v_base, rows, c0, c1, k_stride_l, True, D, D_PAD, BLOCK_N, scale
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_base = out_ptr + b.to(tl.int64) * o_stride_b + h.to(tl.int64) * o_stride_h
    tl.store(
        o_base + rows64[:, None] * o_stride_l + lanes[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def launch_constexprs(heads: int, kv_heads: int, dim: int) -> dict:
    return dict(
        HEADS=heads,
        KV_HEADS=kv_heads,
        D=dim,
        D_PAD=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )


def segment_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    rows: tuple[int, int],
    full: tuple[tuple[int, int], ...],
    causal: tuple[int, int],
    scale: float,
) -> None:
    """Writes ``out[:, :, r0:r1]`` for ``q (B, H, L, D)``, ``k``/``v`` ``(B, H_kv, L, D)``
    (same strides, contiguous last dim) over ``full`` (at most two spans) and ``causal``."""
    batch, heads, _, dim = q.shape
    spans = list(full) + [(0, 0)] * (2 - len(full))
    (a0, a1), (b0, b1) = spans
    r0, r1 = rows
    grid = (batch * heads, triton.cdiv(r1 - r0, BLOCK_M))
    segment_attention_kernel[grid](
        q,
        k,
        v,
        out,
        r0,
        r1,
        a0,
        a1,
        b0,
        b1,
        causal[0],
        causal[1],
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        num_warps=NUM_WARPS,
        **launch_constexprs(heads, k.shape[1], dim),
    )
