// Per-sample pieces of the compressor's X pass on CPU (framework-free; scheduled by
// csrc/cpu/context_pool_kernels.inc). With M = N_g * heads folded queries of width d:
//   scores (T, mp) = X (T, d) . folded^T, softmax over T per column,
//   context (M, d) = probs^T . X, and the s x s average pool of the H x W grid.
// mp is padded_queries(M) (below); the pad columns of folded^T are zero and never read
// back. X comes from DRAM once: per tile of rows (one band of s grid rows), the scores,
// the pooling and the context update (online softmax) run while the tile is in L2.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fastcompress/simd.h"

namespace fastcompress {
inline namespace FC_ISA_NS {
namespace context_pool {

using simd::kLanes;
using simd::loadv;
using simd::splat;
using simd::storev;
using simd::vecf;

// RB rows of X against MV column vectors of folded^T (d, mp): each x value is one
// broadcast shared by MV FMAs, RB * MV accumulators stay in registers.
template <int RB, int MV>
inline void scores_block(const float* x, int64_t d, const float* folded_t, int64_t mp, int64_t col,
                         float* scores) {
  vecf acc[RB][MV] = {};
  for (int64_t k = 0; k < d; ++k) {
    vecf f[MV];
    for (int v = 0; v < MV; ++v) f[v] = loadv(folded_t + k * mp + col + v * kLanes);
    for (int r = 0; r < RB; ++r) {
      const vecf xb = splat(x[r * d + k]);
      for (int v = 0; v < MV; ++v) acc[r][v] += xb * f[v];  // contracted to FMA
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < MV; ++v) storev(scores + r * mp + col + v * kLanes, acc[r][v]);
  }
}

template <int RB, int MV>
inline int64_t scores_rows_tiled(const float* x, int64_t t, int64_t t1, int64_t d,
                                 const float* folded_t, int64_t mp, int64_t col, float* scores) {
  for (; t + RB <= t1; t += RB)
    scores_block<RB, MV>(x + t * d, d, folded_t, mp, col, scores + t * mp);
  return t;
}

// scores[t, :] for rows t in [t0, t1).
inline void scores_rows(const float* x, int64_t t0, int64_t t1, int64_t d, const float* folded_t,
                        int64_t mp, float* scores) {
  int64_t col = 0;
  for (; col + 2 * kLanes <= mp; col += 2 * kLanes) {
    const int64_t t = scores_rows_tiled<6, 2>(x, t0, t1, d, folded_t, mp, col, scores);
    scores_rows_tiled<1, 2>(x, t, t1, d, folded_t, mp, col, scores);
  }
  if (col < mp) {
    const int64_t t = scores_rows_tiled<8, 1>(x, t0, t1, d, folded_t, mp, col, scores);
    scores_rows_tiled<1, 1>(x, t, t1, d, folded_t, mp, col, scores);
  }
}

// In place: each column of scores (T, mp) becomes its softmax over the T rows.
inline void softmax_columns(float* scores, int64_t tokens, int64_t mp) {
  for (int64_t col = 0; col < mp; col += kLanes) {
    vecf peak = splat(-__builtin_inff());
    for (int64_t t = 0; t < tokens; ++t) peak = simd::vmax(peak, loadv(scores + t * mp + col));
    vecf total = {};
    for (int64_t t = 0; t < tokens; ++t) {
      const vecf e = simd::exp_nonpositive(loadv(scores + t * mp + col) - peak);
      storev(scores + t * mp + col, e);
      total += e;
    }
    const vecf inv = 1.f / total;
    for (int64_t t = 0; t < tokens; ++t) {
      storev(scores + t * mp + col, loadv(scores + t * mp + col) * inv);
    }
  }
}

// Online softmax over one tile of rows of scores (rows, mp): `scores` becomes
// exp(score - new max), and alpha = exp(old max - new max) rescales what was accumulated
// before (0 on the first tile: -inf - max gives exp 0). run_max / run_sum / alpha: (mp).
inline void online_softmax_tile(float* scores, int64_t rows, int64_t mp, float* run_max,
                                float* run_sum, float* alpha) {
  for (int64_t col = 0; col < mp; col += kLanes) {
    vecf peak = loadv(run_max + col);
    for (int64_t t = 0; t < rows; ++t) peak = simd::vmax(peak, loadv(scores + t * mp + col));
    const vecf a = simd::exp_nonpositive(loadv(run_max + col) - peak);
    vecf total = {};
    for (int64_t t = 0; t < rows; ++t) {
      const vecf e = simd::exp_nonpositive(loadv(scores + t * mp + col) - peak);
      storev(scores + t * mp + col, e);
      total += e;
    }
    storev(alpha + col, a);
    storev(run_max + col, peak);
    storev(run_sum + col, loadv(run_sum + col) * a + total);
  }
}

// context[m, :] *= factor[m] for the m_valid rows.
inline void scale_rows(float* context, int64_t m_valid, int64_t d, const float* factor) {
  for (int64_t m = 0; m < m_valid; ++m) {
    if (factor[m] == 1.f) continue;
    const vecf f = splat(factor[m]);
    int64_t k = 0;
    for (; k + kLanes <= d; k += kLanes)
      storev(context + m * d + k, loadv(context + m * d + k) * f);
    for (; k < d; ++k) context[m * d + k] *= factor[m];
  }
}

// context[m0 + i, k0 : k0 + 16 KV] += sum_t probs[t, m0 + i] x[t, k0 : ...] over tokens
// [t0, t1) for MB rows; each x vector is shared by MB FMAs. Rows m0 + i >= m_valid are
// computed (probs has mp >= m0 + MB columns) but neither loaded nor stored.
template <int MB, int KV>
inline void context_block(const float* probs, const float* x, int64_t t0, int64_t t1, int64_t d,
                          int64_t mp, int64_t m0, int64_t m_valid, int64_t k0, float* context) {
  vecf acc[MB][KV] = {};
  for (int i = 0; i < MB && m0 + i < m_valid; ++i) {
    for (int j = 0; j < KV; ++j) acc[i][j] = loadv(context + (m0 + i) * d + k0 + j * kLanes);
  }
  for (int64_t t = t0; t < t1; ++t) {
    vecf xv[KV];
    for (int j = 0; j < KV; ++j) xv[j] = loadv(x + t * d + k0 + j * kLanes);
    for (int i = 0; i < MB; ++i) {
      const vecf pb = splat(probs[t * mp + m0 + i]);
      for (int j = 0; j < KV; ++j) acc[i][j] += pb * xv[j];
    }
  }
  for (int i = 0; i < MB && m0 + i < m_valid; ++i) {
    for (int j = 0; j < KV; ++j) storev(context + (m0 + i) * d + k0 + j * kLanes, acc[i][j]);
  }
}

// Rows of the context per register block: MB x 2 accumulators + 2 x vectors + 1
// broadcast must fit the vector registers (8 x 2 + 3 = 19 of 32 zmm; 6 x 2 + 3 = 15 of
// 16 ymm/xmm). The probs matrix must have at least ceil(M / kContextRows) * kContextRows
// columns (padded_queries), since a block's extra rows are computed, not stored.
constexpr int kContextRows = simd::kRegisters >= 32 ? 8 : 6;

inline int64_t padded_queries(int64_t m) {
  const int64_t blocks = (m + kContextRows - 1) / kContextRows * kContextRows;
  return (blocks + 15) / 16 * 16;  // whole 16-float rows for every lane width
}

// Tokens per tile of the context pass: each column block sweeps the tile's rows for
// every row block while they are in L1/L2. Sweeping all T rows per column block instead
// strides 4 KiB at d = 1024 (a new page per row, no prefetch) and ran at a third of the
// speed; 256 measured 82 -> 96 GFLOP/s on one core at d = 1024 over 64 (`8 x 2` blocks,
// near the 113 GFLOP/s FMA peak; 4 x 4 blocks ran at 43-63).
constexpr int64_t kTokenTile = 256;

// context (m_valid, d), columns [k_begin, k_end) (k_begin a multiple of 16), accumulated
// over all tokens into a zero-initialised context.
inline void context_columns(const float* probs, const float* x, int64_t tokens, int64_t d,
                            int64_t mp, int64_t m_valid, int64_t k_begin, int64_t k_end,
                            float* context) {
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenTile) {
    const int64_t t1 = std::min(tokens, t0 + kTokenTile);
    int64_t k = k_begin;
    for (; k + 2 * kLanes <= k_end; k += 2 * kLanes) {
      for (int64_t m0 = 0; m0 < m_valid; m0 += kContextRows)
        context_block<kContextRows, 2>(probs, x, t0, t1, d, mp, m0, m_valid, k, context);
    }
    for (; k + kLanes <= k_end; k += kLanes) {
      for (int64_t m0 = 0; m0 < m_valid; m0 += kContextRows)
        context_block<kContextRows, 1>(probs, x, t0, t1, d, mp, m0, m_valid, k, context);
    }
    for (int64_t m = 0; m < m_valid; ++m) {
      for (int64_t j = k; j < k_end; ++j) {
        float s = context[m * d + j];
        for (int64_t t = t0; t < t1; ++t) s += probs[t * mp + m] * x[t * d + j];
        context[m * d + j] = s;
      }
    }
  }
}

// Pooled row i (grid rows i*s .. i*s + s - 1) of a row-major H x W grid: W / s tokens.
// Summed top-to-bottom, left-to-right, then divided by s*s: the order and rounding of
// ATen's channels-last avg_pool2d, so the result is bit-identical to the reference.
inline void pool_row(const float* x, int64_t width, int64_t d, int64_t s, int64_t i, float* out) {
  const float count = static_cast<float>(s * s);
  for (int64_t j = 0; j < width / s; ++j) {
    float* dst = out + j * d;
    int64_t k = 0;
    for (; k + kLanes <= d; k += kLanes) {
      vecf acc = {};
      for (int64_t r = 0; r < s; ++r) {
        const float* src = x + ((i * s + r) * width + j * s) * d + k;
        for (int64_t c = 0; c < s; ++c) acc += loadv(src + c * d);
      }
      storev(dst + k, acc / count);
    }
    for (; k < d; ++k) {
      float acc = 0.f;
      for (int64_t r = 0; r < s; ++r) {
        for (int64_t c = 0; c < s; ++c) acc += x[((i * s + r) * width + j * s + c) * d + k];
      }
      dst[k] = acc / count;
    }
  }
}

}  // namespace context_pool
}  // namespace FC_ISA_NS
}  // namespace fastcompress
