// The ISA level that a translation unit of the CPU kernels is compiled for, and the one
// scalar primitive whose rounding depends on it. Framework-free, host and CUDA.
//
//   FC_ISA_LEVEL 3  AVX-512F       FC_ISA_NS isa_avx512
//   FC_ISA_LEVEL 2  AVX2 + FMA     FC_ISA_NS isa_avx2
//   FC_ISA_LEVEL 1  baseline       FC_ISA_NS isa_baseline (SSE2 x86-64, NEON aarch64)
//
// csrc/cpu/isa_*.cpp set both before including the kernels, so each level's code lives
// in its own namespace (no symbol is shared between levels: the linker cannot pick an
// AVX-512 copy of an inline function for the AVX2 path). Anything else gets the baseline.
#pragma once

#include <math.h>

#ifndef FC_ISA_LEVEL
#define FC_ISA_LEVEL 1
#endif
#ifndef FC_ISA_NS
#define FC_ISA_NS isa_baseline
#endif

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif

// Whether fmaf and the vector fma are single instructions at this level. Where they are
// not (x86-64 baseline: SSE2 has no FMA, and libm's fmaf is emulated in software),
// products and sums round separately in the vector code and the scalar code alike, so
// the two still agree bit for bit.
#if FC_ISA_LEVEL >= 2 || defined(__aarch64__) || defined(__CUDACC__)
#define FC_HAS_FMA 1
#else
#define FC_HAS_FMA 0
#endif

namespace fastcompress {
inline namespace FC_ISA_NS {

// a * b + c: one rounding where the level has FMA, two where it has not (see above).
FC_HOST_DEVICE float scalar_fma(float a, float b, float c) {
#if FC_HAS_FMA
  return fmaf(a, b, c);
#else
  volatile float product = a * b;  // never contracted, whatever the flags
  return product + c;
#endif
}

}  // namespace FC_ISA_NS
}  // namespace fastcompress
