"""Triton kernel of the UniCompress compressor's X pass, with its launcher.

With the key projection folded into the queries (``A = W_k,h^T q_h / sqrt(d_h)``, M =
N_g * heads rows), meta-token attention over X is ``softmax_T(X A^T)^T X``, and the
pooled tokens are averages of the same X rows. One program per (batch, T split, d
chunk) walks tiles of ``stride`` grid rows (s * W tokens): scores over the full d,
online softmax across tiles, the context for its d chunk, and the pooled rows of its d
chunk through a tiny MMA with an averaging matrix built from iota. Splits over T are
merged afterwards with their log-sum-exp. Products in IEEE fp32 for parity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (stride, x is float32) -> (elements of the (BLOCK_T, BLOCK_D) X tile, warps, divisor of
# the score chunk). Chosen by compiling candidates for sm_80 and sm_90 at the benchmark
# shapes (d = 64 / 256 / 1024) and keeping one with no spills for every d; no single
# setting was spill-free everywhere (see benchmarks/NOTES.md). Stride 0: meta tokens only.
LAUNCH_TABLE = {
    (2, True): (8192, 8, 2),
    (2, False): (4096, 8, 2),
    (4, True): (8192, 8, 4),
    (4, False): (8192, 8, 2),
    (0, True): (2048, 4, 1),
    (0, False): (4096, 8, 2),
}


@triton.jit
def meta_context_pool_kernel(
    x_ptr,
    a_ptr,
    ctx_ptr,
    m_ptr,
    l_ptr,
    pooled_ptr,
    tokens,
    dim,
    tiles_per_split,
    GRID_W: tl.constexpr,
    STRIDE: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    WRITE_POOL: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    dc = tl.program_id(2)
    num_splits = tl.num_programs(1)
    TILE: tl.constexpr = STRIDE * GRID_W
    POOL_W: tl.constexpr = GRID_W // STRIDE

    offs_t = tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    offs_d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < POOL_W
    # Averaging matrix: pooled column p takes the tile's tokens with (i % W) // s == p.
    col = (offs_t % GRID_W) // STRIDE
    in_tile = (offs_t < TILE)[None, :]
    pool = tl.where((col[None, :] == offs_p[:, None]) & in_tile, 1.0 / (STRIDE * STRIDE), 0.0)

    x_b = x_ptr + b.to(tl.int64) * tokens * dim
    pooled_b = pooled_ptr + b.to(tl.int64) * (tokens // (STRIDE * STRIDE)) * dim
    n_tiles = tl.cdiv(tokens, TILE)
    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    acc = tl.zeros((M_PAD, BLOCK_D), tl.float32)
    for i in range(0, tiles_per_split):
        tile = split * tiles_per_split + i
        if tile < n_tiles:
            rows = tile * TILE + offs_t
            t_ok = (offs_t < TILE) & (rows < tokens)
            scores = tl.zeros((BLOCK_T, M_PAD), tl.float32)
            for k0 in range(0, dim, BLOCK_DK):
                offs_k = k0 + tl.arange(0, BLOCK_DK)
                k_ok = offs_k < dim
                xk = tl.load(
                    x_b + rows[:, None] * dim + offs_k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                ak = tl.load(
                    a_ptr + offs_m[None, :] * dim + offs_k[:, None],
                    mask=m_ok[None, :] & k_ok[:, None],
                    other=0.0,
                )
                scores += tl.dot(xk, ak, input_precision="ieee")
            scores = tl.where(t_ok[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, axis=0)
            xd = tl.load(
                x_b + rows[:, None] * dim + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p), xd, input_precision="ieee")
            m_i = m_new
            if WRITE_POOL:
                pooled = tl.dot(pool, xd, input_precision="ieee")
                prow = tile * POOL_W + offs_p
                tl.store(
                    pooled_b + prow[:, None] * dim + offs_d[None, :],
                    pooled.to(pooled_ptr.dtype.element_ty),
                    mask=p_ok[:, None] & d_ok[None, :],
                )
    part = (b * num_splits + split).to(tl.int64)
    tl.store(
        ctx_ptr + (part * M + offs_m[:, None]) * dim + offs_d[None, :],
        acc,
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if dc == 0:
        tl.store(m_ptr + part * M + offs_m, m_i, mask=m_ok)
        tl.store(l_ptr + part * M + offs_m, l_i, mask=m_ok)


# Without pooling (meta tokens only) X is walked in tiles of this many tokens.
ATTENTION_TILE = 64
# The context accumulator M_PAD x BLOCK_D: at most what the tuned shape holds (32 x 128).
CONTEXT_TILE_ELEMENTS = 32 * 128
QUERY_TILE_ELEMENTS = 64 * 32


def launch_config(grid_w: int, stride: int, dim: int, rows: int, float32: bool) -> tuple[dict, int]:
    """(constexprs, num_warps) for a problem; ``rows`` = M folded queries; ``stride`` 0:
    no pooling (X is walked in tiles of ATTENTION_TILE tokens)."""
    write_pool = stride > 0
    if not write_pool:
        grid_w, stride = ATTENTION_TILE, 1
    block_t = max(16, triton.next_power_of_2(stride * grid_w))
    # The table's rows were tuned at W = 32: they are bands of 64 (s = 2) and 128 (s = 4)
    # tokens, and the band, not s, sets the register tiles.
    band_row = 0 if not write_pool else (2 if block_t <= 64 else 4)
    tile_elements, num_warps, dk_divisor = LAUNCH_TABLE[(band_row, float32)]
    m_pad = max(16, triton.next_power_of_2(rows))
    # Tuned at M_PAD = 32. The score tile (BLOCK_T x M_PAD) and the context (M_PAD x
    # BLOCK_D) live in registers too, so more folded queries shrink the d tiles in
    # proportion (compile-checked at the corners in fastcompress/triton_aot.py).
    tile_elements = tile_elements * 32 // max(32, m_pad)
    block_d = max(16, min(triton.next_power_of_2(dim), tile_elements // block_t))
    block_d = max(16, min(block_d, 128, CONTEXT_TILE_ELEMENTS // m_pad))
    block_dk = max(16, min(block_d, tile_elements // dk_divisor // block_t))
    # The folded-query tile BLOCK_DK x M_PAD: no larger than at the tuned shape (64 x 32),
    # or a narrow band (small BLOCK_T) would take a d slice as wide as the whole tile.
    block_dk = max(16, min(block_dk, QUERY_TILE_ELEMENTS // m_pad))
    if m_pad >= 64:  # the score tile doubles
        num_warps = max(num_warps, 8)
    constexprs = dict(
        GRID_W=grid_w,
        STRIDE=stride,
        M=rows,
        M_PAD=m_pad,
        BLOCK_T=block_t,
        BLOCK_P=max(16, triton.next_power_of_2(grid_w // stride)),
        BLOCK_D=block_d,
        BLOCK_DK=block_dk,
        WRITE_POOL=write_pool,
    )
    return constexprs, num_warps


# The launch corners compile-checked for spills (tests/test_gpu_compile.py): tokens per
# band (s * W) and folded queries (N_g * heads) up to these, and their product.
MAX_BAND_TOKENS = 128
MAX_POOLED_COLUMNS = 16
MAX_ROWS = 32  # 64 spilled at several bands (notes: "Triton launch corners")


def unsupported_reason(grid_w: int, stride: int, rows: int) -> str | None:
    """Why the kernel does not take this shape (its tiles would spill), or None."""
    band = stride * grid_w if stride else ATTENTION_TILE
    columns = grid_w // stride if stride else 0
    if band > MAX_BAND_TOKENS or columns > MAX_POOLED_COLUMNS or rows > MAX_ROWS:
        return (
            f"the Triton compressor supports s * W <= {MAX_BAND_TOKENS} tokens per band, "
            f"W / s <= {MAX_POOLED_COLUMNS} pooled columns and N_g * heads <= {MAX_ROWS}; "
            f"got s * W = {band}, W / s = {columns}, N_g * heads = {rows}"
        )
    return None


def meta_context_pool_triton(
    x: Tensor, folded: Tensor, grid: tuple[int, int], stride: int, target_programs: int = 264
) -> tuple[Tensor, Tensor]:
    """``x (B, T, d)``, ``folded (M, d)`` float32 -> (context ``(B, M, d)`` float32,
    pooled ``(B, T / s^2, d)`` in x.dtype; ``(B, 0, d)`` when ``stride`` is 0)."""
    batch, tokens, dim = x.shape
    rows = folded.shape[0]
    blocks, num_warps = launch_config(grid[1], stride, dim, rows, x.dtype == torch.float32)
    d_chunks = triton.cdiv(dim, blocks["BLOCK_D"])
    n_tiles = triton.cdiv(tokens, blocks["STRIDE"] * blocks["GRID_W"])
    splits = max(1, min(n_tiles, triton.cdiv(target_programs, batch * d_chunks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    ctx = torch.empty((batch, splits, rows, dim), device=x.device, dtype=torch.float32)
    m_part = torch.empty((batch, splits, rows), device=x.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    pooled_tokens = tokens // stride**2 if stride else 0
    pooled = torch.empty((batch, pooled_tokens, dim), device=x.device, dtype=x.dtype)
    meta_context_pool_kernel[(batch, splits, d_chunks)](
        x,
        folded,
        ctx,
        m_part,
        l_part,
        pooled,
        tokens,
        dim,
        tiles_per_split,
        num_warps=num_warps,
        **blocks,
    )
    # Log-sum-exp merge of the splits.
    m = m_part.amax(1, keepdim=True)
    weight = torch.exp(m_part - m)
    total = (l_part * weight).sum(1)
    context = (ctx * weight[..., None]).sum(1) / total[..., None]
    return context, pooled
