// Float vectors for the CPU kernels at one ISA level (GCC/Clang vector extensions plus a
// few intrinsics). The kernels are compiled once per level, each time inside its own
// namespace, and chosen at run time (csrc/cpu/isa_*.cpp, csrc/cpu/ops.cpp):
//
//   FC_ISA_LEVEL 3  AVX-512F     16 lanes, 32 vector registers
//   FC_ISA_LEVEL 2  AVX2 + FMA    8 lanes, 16 vector registers
//   FC_ISA_LEVEL 1  baseline      4 lanes (SSE2 on x86-64, NEON on aarch64), 16 (32 NEON)
//
// (levels and namespaces: isa.h). Register blocking in the kernels is derived from kLanes
// and kRegisters, never written for one width.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastcompress/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace fastcompress {
inline namespace FC_ISA_NS {
namespace simd {

#if FC_ISA_LEVEL == 3
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
#elif FC_ISA_LEVEL == 2
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
constexpr int kLanes = 4;
#if defined(__aarch64__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif
#endif

typedef float vecf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t veci __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vecf loadv(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storev(float* p, vecf v) { std::memcpy(p, &v, sizeof(v)); }

#if FC_ISA_LEVEL == 3 && defined(FC_EMULATE_AVX512)
// Test builds only (FASTCOMPRESS_EMULATE_AVX512=1, csrc/cpu/isa_avx512.cpp): the AVX-512
// level's kernels, with its 16-lane vectors and 32-register blocking, compiled for AVX2 +
// FMA so that a CPU without AVX-512 runs them. Only the two intrinsics below differ: each
// works on two 256-bit halves, with the same rounding (one FMA per lane).
inline __m256 half(vecf v, int which) {
  __m256 h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + 32 * which, sizeof(h));
  return h;
}

inline vecf from_halves(__m256 low, __m256 high) {
  vecf v;
  std::memcpy(&v, &low, sizeof(low));
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &high, sizeof(high));
  return v;
}
#endif

// A true broadcast: `vecf{} + v` costs a scalar add (0 + v is not v for v = -0) and a
// register shuffle per call, where a broadcast load folds into the load port.
inline vecf splat(float v) {
#if FC_ISA_LEVEL == 3 && defined(FC_EMULATE_AVX512)
  return from_halves(_mm256_set1_ps(v), _mm256_set1_ps(v));
#elif FC_ISA_LEVEL == 3
  return reinterpret_cast<vecf>(_mm512_set1_ps(v));
#elif FC_ISA_LEVEL == 2
  return reinterpret_cast<vecf>(_mm256_set1_ps(v));
#elif defined(__aarch64__)
  return reinterpret_cast<vecf>(vdupq_n_f32(v));
#else
  return reinterpret_cast<vecf>(_mm_set1_ps(v));
#endif
}

inline float hsum(vecf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline vecf vmax(vecf a, vecf b) { return a > b ? a : b; }

// a * b + c lane for lane, rounded as scalar_fma rounds. Written out (not left to
// -ffp-contract) where a scalar chain must reproduce the same bits: contraction may
// fuse either product of a sum of two products.
inline vecf fmav(vecf a, vecf b, vecf c) {
#if FC_ISA_LEVEL == 3 && defined(FC_EMULATE_AVX512)
  return from_halves(_mm256_fmadd_ps(half(a, 0), half(b, 0), half(c, 0)),
                     _mm256_fmadd_ps(half(a, 1), half(b, 1), half(c, 1)));
#elif FC_ISA_LEVEL == 3
  return reinterpret_cast<vecf>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#elif FC_ISA_LEVEL == 2
  return reinterpret_cast<vecf>(_mm256_fmadd_ps(
      reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#elif defined(__aarch64__)
  return reinterpret_cast<vecf>(vfmaq_f32(reinterpret_cast<float32x4_t>(c),
                                          reinterpret_cast<float32x4_t>(a),
                                          reinterpret_cast<float32x4_t>(b)));
#else
  return reinterpret_cast<vecf>(
      _mm_add_ps(_mm_mul_ps(reinterpret_cast<__m128>(a), reinterpret_cast<__m128>(b)),
                 reinterpret_cast<__m128>(c)));
#endif
}

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + r with n = round(x / ln2) and
// |r| <= ln2 / 2, then 2^n times a degree-6 polynomial for e^r (Cephes' expf
// coefficients), about 2 ulp. Arguments below -87.3 (where e^x leaves the normal range)
// give 0, as the softmax of a masked-out score should.
inline vecf exp_nonpositive(vecf x) {
  const vecf tiny = x < -87.3f ? splat(0.f) : splat(1.f);
  x = x < -87.3f ? splat(-87.3f) : x;
  const vecf shifted = x * 1.44269504088896341f + 12582912.f;  // round to nearest
  const vecf n = shifted - 12582912.f;
  const vecf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vecf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const veci bits = (__builtin_convertvector(n, veci) + 127) << 23;
  vecf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * tiny;
}

// 2^x for x <= 0, with x clamped at -126: x = n + f with n = round(x) and |f| <= 1/2,
// then 2^n (exponent bits) times a degree-6 polynomial for 2^f (a relative-error
// minimax fit on [-1/2, 1/2], coefficients rounded to float32). Maximum relative error
// 9.8e-8 (0.82 ulp; 0.66 with FMA) on [-126, 0], checked against float64 at every level by
// tests/test_entropy_kernel.py. (Degree 5 saves one FMA but reached 1.8 ulp, and the
// entropy's gradients then lost to torch's own exp by 2-3x at ill-conditioned logits.)
// Below -126 the result is 2^-126 times the polynomial (about 1.2e-38), never 0 and
// never subnormal: a softmax weight that small adds nothing, and x times it stays
// finite. NaN stays NaN.
inline vecf exp2_nonpositive(vecf x) {
  x = x < -126.f ? splat(-126.f) : x;
  const vecf shifted = x + 12582912.f;  // 1.5 * 2^23: rounds x to an integer in the low bits
  const vecf f = x - (shifted - 12582912.f);
  vecf p = splat(1.5346250438597053e-4f);
  p = fmav(p, f, splat(1.3399935560300946e-3f));
  p = fmav(p, f, splat(9.61848720908165e-3f));
  p = fmav(p, f, splat(5.550328642129898e-2f));
  p = fmav(p, f, splat(2.4022646248340607e-1f));
  p = fmav(p, f, splat(6.931471824645996e-1f));
  p = fmav(p, f, splat(1.f));
  veci bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits + 127) << 23;  // the low bits of `shifted` hold n: 2^n as a float
  vecf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace simd
}  // namespace FC_ISA_NS
}  // namespace fastcompress
