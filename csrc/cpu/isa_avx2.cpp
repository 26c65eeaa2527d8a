// The CPU kernels compiled for AVX2 + FMA (8 lanes, 16 ymm registers).
// Chosen at run time by csrc/cpu/ops.cpp; nothing here runs unless the CPU has the level.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define FC_ISA_LEVEL 2
#define FC_ISA_NS isa_avx2

#include "context_pool_kernels.inc"
#include "decode_step_kernels.inc"
#include "entropy_kernels.inc"
#include "mcq_kernels.inc"

#pragma GCC pop_options
#endif
