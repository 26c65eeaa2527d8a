"""Triton split-K decode attention over a KV cache, with its launcher.

One program per (batch, kv head, split) reads keys [split * chunk, (split+1) * chunk)
clipped to the filled length of that sample, for all the query heads of its GQA group
at once (group * Sq rows, padded to the MMA's 16), with an online softmax. Each split
writes its unnormalised output and log-sum-exp; the splits are merged afterwards.
Products in IEEE fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcompress.triton_kernels.online_softmax import online_softmax_step

# Keys per tile: BLOCK_N x D_PAD <= KV_TILE_ELEMENTS. 64 keys at D = 128 spilled up to
# 8.7 KiB on sm_90 (4 warps); 32 keys do not (tests/test_gpu_compile.py).
KV_TILE_ELEMENTS = 4096


# Query rows per program (GQA group x Sq, padded) and head dims compile-checked for
# spills at these corners (tests/test_gpu_compile.py).
MAX_ROWS = 64
MAX_DIM = 256
MAX_ACC_ELEMENTS = 4096  # ROWS x D_PAD: 64 x 128 spilled on sm_80 even with 16 warps


def _acc_elements(rows: int, dim: int) -> int:
    return max(16, triton.next_power_of_2(rows)) * max(16, triton.next_power_of_2(dim))


def num_warps_for(dim: int, rows: int = 1) -> int:
    """By the accumulator tile ROWS x D_PAD: 4 warps up to 16 x 64, else 8 (16 x 128
    with 4 warps spilled on sm_90)."""
    return 4 if _acc_elements(rows, dim) <= 1024 else 8


def unsupported_reason(heads: int, kv_heads: int, sq: int, dim: int) -> str | None:
    rows = heads // kv_heads * sq
    if rows > MAX_ROWS or dim > MAX_DIM or _acc_elements(rows, dim) > MAX_ACC_ELEMENTS:
        return (
            f"the Triton decode kernel supports (H / H_kv) * Sq <= {MAX_ROWS}, D <= {MAX_DIM} "
            f"and (H / H_kv) * Sq * D <= {MAX_ACC_ELEMENTS} (padded to powers of two), got "
            f"{heads // kv_heads} * {sq} rows and D = {dim}"
        )
    return None


@triton.jit
def decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lengths_ptr,
    out_ptr,
    lse_ptr,
    s_max,
    chunk,
    scale,
    q_stride_b,
    q_stride_s,
    q_stride_h,
    k_stride_b,
    k_stride_s,
    k_stride_h,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    SQ: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    GROUP: tl.constexpr = HEADS // KV_HEADS
    rows = tl.arange(0, ROWS)  # row r: head kvh * GROUP + r // SQ, query r % SQ
    row_ok = rows < GROUP * SQ
    head = kvh * GROUP + rows // SQ
    query = rows % SQ
    lanes = tl.arange(0, D_PAD)
    lane_ok = lanes < D
    length = tl.load(lengths_ptr + b)
    # Offsets in 64 bits wherever a product can pass 2^31 elements: key * stride_s does
    # once S_max * H_kv * D per sample does (~512k tokens at 32 heads x 128).
    q = tl.load(
        q_ptr
        + b.to(tl.int64) * q_stride_b
        + query[:, None].to(tl.int64) * q_stride_s
        + head[:, None].to(tl.int64) * q_stride_h
        + lanes[None, :],
        mask=row_ok[:, None] & lane_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    # Last key each row may see: all filled keys, or causal (bottom-right aligned).
    limit = length - 1
    if CAUSAL:
        limit = length - SQ + query
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D_PAD), tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    kv_base = b.to(tl.int64) * k_stride_b + kvh.to(tl.int64) * k_stride_h
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        offs = kv_base + keys[:, None].to(tl.int64) * k_stride_s + lanes[None, :]
        k = tl.load(k_ptr + offs, mask=key_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=key_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = key_ok[None, :] & (keys[None, :] <= limit[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i)
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    part = ((b * num_splits + split) * HEADS + head).to(tl.int64) * SQ + query
    tl.store(
        out_ptr + part[:, None] * D + lanes[None, :],
        acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
        mask=row_ok[:, None] & lane_ok[None, :],
    )
    tl.store(lse_ptr + part, lse, mask=row_ok)


def launch_constexprs(heads: int, kv_heads: int, sq: int, dim: int, causal: bool) -> dict:
    group_rows = heads // kv_heads * sq
    d_pad = max(16, triton.next_power_of_2(dim))
    rows = max(16, triton.next_power_of_2(group_rows))
    # The score tile is ROWS x BLOCK_N and the accumulator ROWS x D_PAD: more query rows
    # per program (GQA group x Sq) take fewer keys per tile.
    return dict(
        HEADS=heads,
        KV_HEADS=kv_heads,
        SQ=sq,
        D=dim,
        D_PAD=d_pad,
        ROWS=rows,
        BLOCK_N=max(16, KV_TILE_ELEMENTS * 16 // rows // d_pad),
        CAUSAL=causal,
    )


def decode_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: float,
    causal: bool,
    num_splits: int,
):
    """Per-split ``(out (B, splits, H, Sq, D) float32, lse (B, splits, H, Sq))``; the caller
    merges. ``lengths (B,)`` int32: filled length of each sample's cache (after appends)."""
    batch, sq, heads, dim = q.shape
    s_max, kv_heads = k_cache.shape[1], k_cache.shape[2]
    chunk = triton.cdiv(s_max, num_splits)
    out = torch.empty((batch, num_splits, heads, sq, dim), device=q.device, dtype=torch.float32)
    lse = torch.empty((batch, num_splits, heads, sq), device=q.device, dtype=torch.float32)
    decode_attention_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        lengths,
        out,
        lse,
        s_max,
        chunk,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_warps=num_warps_for(dim, heads // kv_heads * sq),
        **launch_constexprs(heads, kv_heads, sq, dim, causal),
    )
    return out, lse
