// Per-task math of one fused decode step of the UniCompress decompressor on CPU
// (framework-free; the torch binding in csrc/cpu/decode_step_kernels.inc schedules it).
//
// At batch 1 a step reads ~60 MB of weights for ~30 MFLOP, so it is bound by memory,
// not FLOPs. ATen's batch-1 linear runs single-threaded at ~8 GB/s from DRAM on this
// machine kind; these GEMVs stream each weight row once for all batch rows, and every
// thread streams its own block of rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fastcompress/simd.h"

namespace fastcompress {
inline namespace FC_ISA_NS {
namespace decode {

using simd::hsum;
using simd::kLanes;
using simd::loadv;
using simd::vecf;

enum class Epilogue { kStore, kAddInto, kGelu, kGeluTanh };

inline float gelu(float v, bool tanh_approx) {
  if (tanh_approx) {
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + std::tanh(inner));
  }
  return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
}

inline void finish(float acc, float bias, float* dst, Epilogue epilogue) {
  const float v = acc + bias;
  switch (epilogue) {
    case Epilogue::kStore:
      *dst = v;
      break;
    case Epilogue::kAddInto:
      *dst += v;
      break;
    case Epilogue::kGelu:
      *dst = gelu(v, false);
      break;
    case Epilogue::kGeluTanh:
      *dst = gelu(v, true);
      break;
  }
}

// Software prefetch distance along the weights, in floats (8 KiB): with batch tiles the
// FMAs per line leave the hardware prefetchers behind (measured 11 -> 17 GB/s at batch 8).
constexpr int64_t kPrefetchFloats = 2048;

// x[b, :] . row for BT batch rows. Each weight row is read as one sequential stream
// (rows interleaved 4 at a time ran at a third of the DRAM bandwidth: the prefetchers
// follow one stream per row badly); U accumulators per batch row hide the FMA latency.
template <int BT>
inline void dot_rows(const float* row, const float* x, int64_t in, float* sums) {
  constexpr int U = BT >= 8 ? 1 : (BT >= 4 ? 2 : 4);
  vecf acc[BT][U] = {};
  int64_t k = 0;
  for (; k + U * kLanes <= in; k += U * kLanes) {
    for (int u = 0; u < U; ++u) {
      __builtin_prefetch(row + k + u * kLanes + kPrefetchFloats, 0, 0);
      const vecf wv = loadv(row + k + u * kLanes);
      for (int b = 0; b < BT; ++b) acc[b][u] += wv * loadv(x + b * in + k + u * kLanes);
    }
  }
  for (; k + kLanes <= in; k += kLanes) {
    const vecf wv = loadv(row + k);
    for (int b = 0; b < BT; ++b) acc[b][0] += wv * loadv(x + b * in + k);
  }
  for (int b = 0; b < BT; ++b) {
    for (int u = 1; u < U; ++u) acc[b][0] += acc[b][u];
    float s = hsum(acc[b][0]);
    for (int64_t j = k; j < in; ++j) s += row[j] * x[b * in + j];
    sums[b] = s;
  }
}

template <int BT>
inline int64_t batch_tiles(const float* row, float bias, const float* x, int64_t b, int64_t batch,
                           int64_t in, float* y, int64_t out, Epilogue epilogue) {
  float sums[BT];
  for (; b + BT <= batch; b += BT) {
    dot_rows<BT>(row, x + b * in, in, sums);
    for (int i = 0; i < BT; ++i) finish(sums[i], bias, y + (b + i) * out, epilogue);
  }
  return b;
}

// y[b, n] (epilogue) x[b, :] . w[n, :] + bias[n] for rows n in [n0, n1) and all batch
// rows. The batch loop is inside the row loop, so a row is read from memory once and
// from L1 for the other batch tiles.
inline void gemv_rows(const float* w, const float* bias, const float* x, int64_t batch, int64_t in,
                      float* y, int64_t out, int64_t n0, int64_t n1, Epilogue epilogue) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * in;
    int64_t b = batch_tiles<8>(row, bias[n], x, 0, batch, in, y + n, out, epilogue);
    b = batch_tiles<4>(row, bias[n], x, b, batch, in, y + n, out, epilogue);
    b = batch_tiles<2>(row, bias[n], x, b, batch, in, y + n, out, epilogue);
    batch_tiles<1>(row, bias[n], x, b, batch, in, y + n, out, epilogue);
  }
}

inline float dot(const float* a, const float* b, int dim) {
  const int body = dim - dim % kLanes;
  vecf acc = {};
  for (int j = 0; j < body; j += kLanes) acc += loadv(a + j) * loadv(b + j);
  float s = hsum(acc);
  for (int j = body; j < dim; ++j) s += a[j] * b[j];
  return s;
}

// Split-K attention of all heads over cached positions [s0, s1) of one sample: key s of
// head h is keys[s * stride + h * dim]. Position-major loops read each cached row (all
// heads, contiguous) once; head-major loops read 256 B of every 2 KiB row per head and
// ran at half the bandwidth. Writes this chunk's unnormalised output (heads, dim), its
// running max and its sum of exponentials, merged by merge_chunks. `scores` is scratch
// of heads * (s1 - s0) floats.
inline void attend_chunk(const float* q, const float* keys, const float* values, int64_t stride,
                         int64_t s0, int64_t s1, int heads, int dim, float scale, float* scores,
                         float* out, float* max_score, float* sum_exp) {
  const int64_t len = s1 - s0;
  for (int h = 0; h < heads; ++h) max_score[h] = -INFINITY;
  for (int64_t s = 0; s < len; ++s) {
    const float* key = keys + (s0 + s) * stride;
    for (int h = 0; h < heads; ++h) {
      const float v = dot(q + h * dim, key + h * dim, dim) * scale;
      scores[h * len + s] = v;
      max_score[h] = std::max(max_score[h], v);
    }
  }
  for (int h = 0; h < heads; ++h) {
    float total = 0.f;
    for (int64_t s = 0; s < len; ++s) {
      scores[h * len + s] = std::exp(scores[h * len + s] - max_score[h]);
      total += scores[h * len + s];
    }
    sum_exp[h] = total;
  }
  std::fill(out, out + heads * dim, 0.f);
  for (int64_t s = 0; s < len; ++s) {
    const float* value = values + (s0 + s) * stride;
    for (int h = 0; h < heads; ++h) {
      const float p = scores[h * len + s];
      for (int j = 0; j < dim; ++j) out[h * dim + j] += p * value[h * dim + j];
    }
  }
}

// out (heads, dim) = softmax-weighted sum over `chunks` partial results laid out as
// partial_out (chunks, heads, dim), partial_max / partial_sum (chunks, heads): the LSE
// merge, exact up to rounding.
inline void merge_chunks(const float* partial_out, const float* partial_max,
                         const float* partial_sum, int64_t chunks, int heads, int dim, float* out) {
  for (int h = 0; h < heads; ++h) {
    float m = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, partial_max[c * heads + h]);
    float total = 0.f;
    float* o = out + h * dim;
    std::fill(o, o + dim, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = std::exp(partial_max[c * heads + h] - m);
      total += w * partial_sum[c * heads + h];
      const float* po = partial_out + (c * heads + h) * dim;
      for (int j = 0; j < dim; ++j) o[j] += w * po[j];
    }
    const float inv = 1.f / total;
    for (int j = 0; j < dim; ++j) o[j] *= inv;
  }
}

// Biased variance, two passes (the values are in L1), as torch.nn.LayerNorm.
inline void layer_norm_row(const float* x, const float* weight, const float* bias, int64_t dim,
                           float eps, float* y) {
  float mean = 0.f;
  for (int64_t j = 0; j < dim; ++j) mean += x[j];
  mean /= static_cast<float>(dim);
  float var = 0.f;
  for (int64_t j = 0; j < dim; ++j) var += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(dim) + eps);
  for (int64_t j = 0; j < dim; ++j) y[j] = (x[j] - mean) * rstd * weight[j] + bias[j];
}

}  // namespace decode
}  // namespace FC_ISA_NS
}  // namespace fastcompress
