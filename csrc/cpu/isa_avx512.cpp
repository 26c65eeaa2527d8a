// The CPU kernels compiled for AVX-512F (16 lanes, 32 zmm registers).
// Chosen at run time by csrc/cpu/ops.cpp; nothing here runs unless the CPU has the level.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#if defined(FC_EMULATE_AVX512)
// Test builds only (FASTCOMPRESS_EMULATE_AVX512=1): this level's code on an AVX2 CPU
// (fastcompress/simd.h says how). Never in a build that users run.
#pragma GCC target("avx2,fma,f16c,bmi2")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#endif
#define FC_ISA_LEVEL 3
#define FC_ISA_NS isa_avx512

#include "context_pool_kernels.inc"
#include "decode_step_kernels.inc"
#include "entropy_kernels.inc"
#include "mcq_kernels.inc"

#pragma GCC pop_options
#endif
