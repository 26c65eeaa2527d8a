// Per-row math of the multi-codebook nearest-neighbour search, shared by the CPU
// kernel (csrc/cpu) and the CUDA kernel (csrc/cuda). Framework-free: raw pointers,
// no torch, compiles as host C++ and as CUDA device code.
//
// Scores are "larger is better" so both metrics share one argmax:
//   cosine: score = z_n . c_n                  (c_n unit rows, bias 0)
//   L2:     score = z . c - |c|^2 / 2          (argmin |z - c|^2; bias = -|c|^2 / 2)
// Ties resolve to the lowest code index, as torch.argmax / argmin do.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fastcompress/isa.h"

namespace fastcompress {
inline namespace FC_ISA_NS {

// F.normalize's epsilon: the norm is clamped from below before dividing.
constexpr float kNormEps = 1e-12f;

// y = x / max(|x|, eps), in the same order as F.normalize (divide, not multiply by a
// reciprocal), so chunks normalised here match torch bit for bit in most rows.
FC_HOST_DEVICE void normalize_chunk(const float* x, float* y, int dim) {
  float sumsq = 0.f;
  for (int j = 0; j < dim; ++j) sumsq += x[j] * x[j];
  float denom = sqrtf(sumsq);
  denom = denom < kNormEps ? kNormEps : denom;
  for (int j = 0; j < dim; ++j) y[j] = x[j] / denom;
}

// Strictly better, or equal with a lower index: the lowest-index tie rule.
FC_HOST_DEVICE bool improves(float score, int32_t code, float best, int32_t best_code) {
  return score > best || (score == best && code < best_code);
}

// Score of one code for one chunk; `row` is the code's d values, `bias` its bias.
FC_HOST_DEVICE float code_score(const float* chunk, const float* row, float bias, int dim) {
  float acc = bias;
  for (int j = 0; j < dim; ++j) acc = scalar_fma(chunk[j], row[j], acc);
  return acc;
}

// Scan codes [begin, end) of a row-major (K, dim) codebook, updating (best, best_code).
FC_HOST_DEVICE void scan_codes(const float* chunk, const float* book, const float* bias, int dim,
                               int32_t begin, int32_t end, float* best, int32_t* best_code) {
  for (int32_t k = begin; k < end; ++k) {
    const float s = code_score(chunk, book + static_cast<int64_t>(k) * dim, bias[k], dim);
    if (improves(s, k, *best, *best_code)) {
      *best = s;
      *best_code = k;
    }
  }
}

// Straight-through output of one chunk and its squared error:
// out = (q - z_n) + z_n (the value UniTok's forward produces), err = sum (q - z_n)^2.
FC_HOST_DEVICE float straight_through(const float* chunk, const float* code_row, float* out,
                                      int dim) {
  float err = 0.f;
  for (int j = 0; j < dim; ++j) {
    const float diff = code_row[j] - chunk[j];
    out[j] = diff + chunk[j];
    err = scalar_fma(diff, diff, err);
  }
  return err;
}

}  // namespace FC_ISA_NS
}  // namespace fastcompress
