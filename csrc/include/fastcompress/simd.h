// 16-lane float vectors for the CPU kernels (GCC/Clang vector extensions: AVX-512 with
// -march=native on this project's machines, split into narrower ops elsewhere).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastcompress {
namespace simd {

constexpr int kLanes = 16;
typedef float vec16 __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec16 __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// A true broadcast: `vec16{} + v` costs a scalar add (0 + v is not v for v = -0) and a
// register shuffle per call, where a broadcast load folds into the load port.
inline vec16 splat(float v) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec16>(_mm512_set1_ps(v));
#else
  vec16 out;
  for (int i = 0; i < kLanes; ++i) out[i] = v;
  return out;
#endif
}

inline float hsum(vec16 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline vec16 vmax(vec16 a, vec16 b) { return a > b ? a : b; }

// a * b + c with one rounding, lane for lane. Written out (not left to -ffp-contract)
// where a scalar fmaf chain must reproduce the same bits: contraction may fuse either
// product of a sum of two products.
inline vec16 fma16(vec16 a, vec16 b, vec16 c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec16>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#else
  vec16 out;
  for (int i = 0; i < kLanes; ++i) out[i] = std::fma(a[i], b[i], c[i]);
  return out;
#endif
}

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + r with n = round(x / ln2) and
// |r| <= ln2 / 2, then 2^n times a degree-6 polynomial for e^r (Cephes' expf
// coefficients), about 2 ulp. Arguments below -87.3 (where e^x leaves the normal range)
// give 0, as the softmax of a masked-out score should.
inline vec16 exp_nonpositive(vec16 x) {
  const vec16 tiny = x < -87.3f ? splat(0.f) : splat(1.f);
  x = x < -87.3f ? splat(-87.3f) : x;
  const vec16 shifted = x * 1.44269504088896341f + 12582912.f;  // round to nearest
  const vec16 n = shifted - 12582912.f;
  const vec16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vec16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const ivec16 bits = (__builtin_convertvector(n, ivec16) + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * tiny;
}

}  // namespace simd
}  // namespace fastcompress
