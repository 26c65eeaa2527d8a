// CUDA kernel of the multi-codebook nearest-neighbour search (indices only).
// Torch-free: raw pointers, a cudaStream_t and C-ABI launchers, so it compiles with
// plain nvcc; the torch binding is csrc/cuda/mcq_binding.cpp. The per-code math
// (normalisation, score, lowest-index tie rule) is the header shared with the CPU
// kernel, so the CPU tests exercise it.
//
// One thread per chunk; blockIdx.y is the codebook. A block stages tiles of the
// codebook (rows + bias) in shared memory and every thread scans them against its
// own chunk held in registers: the N x K matrix never exists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fastcompress/mcq_tile.cuh"

namespace fastcompress {
namespace {

constexpr int kThreads = 128;
constexpr int kTileCodes = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    mcq_search_kernel(const T* __restrict__ z, const float* __restrict__ book,
                      const float* __restrict__ bias, int64_t* __restrict__ indices, int64_t n,
                      int groups, int vocab, int bias_stride, bool normalize) {
  __shared__ float tile[kTileCodes * D];
  __shared__ float tile_bias[kTileCodes];
  const int g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < n;

  float raw[D], chunk[D];
#pragma unroll
  for (int j = 0; j < D; ++j) {
    raw[j] = active ? to_float(z[row * groups * D + g * D + j]) : 0.f;
  }
  if (normalize) {
    normalize_chunk(raw, chunk, D);
  } else {
#pragma unroll
    for (int j = 0; j < D; ++j) chunk[j] = raw[j];
  }

  const float* book_g = book + static_cast<int64_t>(g) * vocab * D;
  float best = -INFINITY;
  int32_t best_code = 0;
  for (int k0 = 0; k0 < vocab; k0 += kTileCodes) {
    const int count = min(kTileCodes, vocab - k0);
    __syncthreads();
    for (int i = threadIdx.x; i < count * D; i += kThreads) tile[i] = book_g[k0 * D + i];
    for (int i = threadIdx.x; i < count; i += kThreads) {
      tile_bias[i] = bias[static_cast<int64_t>(g) * bias_stride + k0 + i];
    }
    __syncthreads();
    for (int k = 0; k < count; ++k) {
      const float s = code_score(chunk, tile + k * D, tile_bias[k], D);
      if (improves(s, k0 + k, best, best_code)) {
        best = s;
        best_code = k0 + k;
      }
    }
  }
  if (active) indices[row * groups + g] = best_code;
}

template <typename T, int D>
int launch(const T* z, const float* book, const float* bias, int64_t* indices, int64_t n,
           int groups, int vocab, int bias_stride, bool normalize, cudaStream_t stream) {
  if (n == 0 || groups == 0) return 0;
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), groups);
  mcq_search_kernel<T, D><<<grid, kThreads, 0, stream>>>(z, book, bias, indices, n, groups, vocab,
                                                         bias_stride, normalize);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int dispatch(const T* z, const float* book, const float* bias, int64_t* indices, int64_t n,
             int groups, int vocab, int bias_stride, int dim, bool normalize, cudaStream_t stream) {
  switch (dim) {
    case 2:
      return launch<T, 2>(z, book, bias, indices, n, groups, vocab, bias_stride, normalize, stream);
    case 4:
      return launch<T, 4>(z, book, bias, indices, n, groups, vocab, bias_stride, normalize, stream);
    case 8:
      return launch<T, 8>(z, book, bias, indices, n, groups, vocab, bias_stride, normalize, stream);
    case 16:
      return launch<T, 16>(z, book, bias, indices, n, groups, vocab, bias_stride, normalize,
                           stream);
    default:
      return -1;  // unsupported code dimension
  }
}

}  // namespace
}  // namespace fastcompress

// C ABI. Returns 0 on success, -1 for an unsupported d, else a cudaError_t.
extern "C" {
int fastcompress_mcq_search_f32(const float* z, const float* book, const float* bias,
                                int64_t* indices, int64_t n, int groups, int vocab, int bias_stride,
                                int dim, int normalize, cudaStream_t stream) {
  return fastcompress::dispatch(z, book, bias, indices, n, groups, vocab, bias_stride, dim,
                                normalize != 0, stream);
}
int fastcompress_mcq_search_bf16(const void* z, const float* book, const float* bias,
                                 int64_t* indices, int64_t n, int groups, int vocab,
                                 int bias_stride, int dim, int normalize, cudaStream_t stream) {
  return fastcompress::dispatch(static_cast<const __nv_bfloat16*>(z), book, bias, indices, n,
                                groups, vocab, bias_stride, dim, normalize != 0, stream);
}
int fastcompress_mcq_search_f16(const void* z, const float* book, const float* bias,
                                int64_t* indices, int64_t n, int groups, int vocab, int bias_stride,
                                int dim, int normalize, cudaStream_t stream) {
  return fastcompress::dispatch(static_cast<const __half*>(z), book, bias, indices, n, groups,
                                vocab, bias_stride, dim, normalize != 0, stream);
}
}
