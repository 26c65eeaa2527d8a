// Every library header the CPU kernels use, included by each csrc/cpu/isa_*.cpp *before*
// its `#pragma GCC target`. Functions defined in these headers thus keep the baseline
// target: where the compiler emits an out-of-line copy of one (a std::vector method, a
// c10 conversion), that copy is shared by all levels through the linker, so it must not
// contain AVX instructions. Only the kernels (the *.inc files and fastcompress/*.h, in
// their per-level namespaces) are compiled for the level.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
