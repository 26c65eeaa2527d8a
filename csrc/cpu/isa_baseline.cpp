// The CPU kernels compiled for the portable baseline (SSE2 on x86-64, NEON through the compiler on
// aarch64). Chosen at run time by csrc/cpu/ops.cpp; nothing here runs unless the CPU has the level.
#include "prelude.h"

#define FC_ISA_LEVEL 1
#define FC_ISA_NS isa_baseline

#include "context_pool_kernels.inc"
#include "decode_step_kernels.inc"
#include "entropy_kernels.inc"
#include "mcq_kernels.inc"
